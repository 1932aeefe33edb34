//! What the daemon knows about itself, for `GET /v1/status`, `/metrics` and
//! `punchd status`.
//!
//! Tasks update a [`StatusBoard`] as things happen (counters are atomics,
//! the rest sits behind short-lived mutexes); readers take a
//! [`StatusDoc`] snapshot. The JSON field names are part of the contract in
//! DESIGN.md: fields may be added, never renamed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

pub use crate::path::{PathState, Transport};

/// The outcome of the most recent punch with a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastPunch {
    /// `ok` or `failed`.
    pub result: String,
    /// Order received → tunnel ready (or given up).
    pub elapsed_ms: u64,
    /// connect() attempts made.
    pub attempts: u32,
    /// Why it failed.
    pub reason: Option<String>,
    /// When it finished, Unix milliseconds.
    #[serde(default)]
    pub finished_unix_ms: u64,
}

/// One peer in the status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerDoc {
    /// Peer name.
    pub name: String,
    /// direct, relayed or none.
    pub path: PathState,
    /// tcp, quic or relay (absent with no tunnel).
    pub transport: Option<Transport>,
    /// The peer's endpoint as we reach it (IPv4 or IPv6).
    pub remote_addr: Option<String>,
    /// `ipv4` or `ipv6`: the address family of `remote_addr`, the one the
    /// tunnel runs over (absent with no tunnel).
    #[serde(default)]
    pub family: Option<String>,
    /// Tunnel round-trip time from keepalive pings.
    pub rtt_ms: Option<f64>,
    /// Tunnel bytes received (on the wire, including TLS and mux overhead).
    pub bytes_in: u64,
    /// Tunnel bytes sent.
    pub bytes_out: u64,
    /// Streams open now.
    pub streams: i64,
    /// The latest punch.
    pub last_punch: Option<LastPunch>,
    /// Punches that ended in a tunnel.
    #[serde(default)]
    pub punches_ok: u64,
    /// Punches that did not.
    #[serde(default)]
    pub punches_failed: u64,
    /// Why the race kept this direct path (TCP preferred, QUIC after the
    /// grace, the only transport raced, chosen by the peer); absent with
    /// no direct tunnel.
    #[serde(default)]
    pub path_kept: Option<String>,
}

/// One forward in the status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardDoc {
    /// Local listen address (the bound one, when port 0 was asked).
    pub listen: String,
    /// Peer offering the service.
    pub peer: String,
    /// Service name.
    pub service: String,
    /// Connections being relayed now.
    pub active: i64,
    /// Connections accepted since start.
    #[serde(default)]
    pub total: u64,
    /// Connections refused at once because the forward already carried
    /// its cap (README, "Limits").
    #[serde(default)]
    pub refused: u64,
    /// `tcp` or `udp`. For UDP, `active` counts flows (one per local
    /// client address) and `total` the flows made since start.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// UDP: datagrams from local clients carried to the peer.
    #[serde(default)]
    pub datagrams_out: u64,
    /// UDP: datagrams from the peer's service delivered to local clients.
    #[serde(default)]
    pub datagrams_in: u64,
    /// UDP: datagrams dropped (a flow's queue full, a flow that could not
    /// open, a client that could not be sent to).
    #[serde(default)]
    pub datagrams_dropped: u64,
}

fn tcp() -> String {
    "tcp".to_owned()
}

/// The whole status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// This daemon's name.
    pub name: String,
    /// Our endpoint as the rendezvous sees it.
    pub public_addr: Option<String>,
    /// Our IPv6 endpoint as the rendezvous sees it (the registration's,
    /// or the observe-only hello's beside an IPv4 registration); null when
    /// we have not reached it over IPv6.
    #[serde(default)]
    pub public_addr6: Option<String>,
    /// connected or disconnected.
    pub rendezvous: String,
    /// The rendezvous instance in use (or being dialled): one of
    /// `[rendezvous] urls`, so a failover shows here.
    #[serde(default)]
    pub rendezvous_url: Option<String>,
    /// The local punch port.
    #[serde(default)]
    pub punch_port: u16,
    /// Our UDP endpoint (the QUIC path) as the rendezvous sees it.
    #[serde(default)]
    pub public_udp_addr: Option<String>,
    /// QUIC connections open on our endpoint, including ones still closing
    /// (absent when QUIC is off).
    #[serde(default)]
    pub quic_connections: Option<usize>,
    /// The router's mapping of the punch port (UPnP IGD, NAT-PMP or PCP);
    /// all null when there is none or `[punch] port_mapping = false`.
    #[serde(default)]
    pub port_mapping: crate::portmap::PortMappingDoc,
    /// NAT discovery (DESIGN.md, "NAT discovery"): how this host's NAT
    /// maps TCP and UDP, as `punchd netcheck --json` prints it; null until
    /// the first check. `port_mapping` is what the port mapper heard.
    #[serde(default)]
    pub nat: Option<crate::nat::NatDoc>,
    /// Every configured peer.
    pub peers: Vec<PeerDoc>,
    /// Every configured forward.
    pub forwards: Vec<ForwardDoc>,
}

/// Mutable per-peer state that is not a counter.
#[derive(Debug, Default, Clone)]
pub(crate) struct PeerState {
    pub(crate) path: PathState,
    pub(crate) transport: Option<Transport>,
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) rtt_ms: Option<f64>,
    pub(crate) last_punch: Option<LastPunch>,
    pub(crate) path_kept: Option<String>,
}

/// Live status of one peer.
#[derive(Debug)]
pub struct PeerStatus {
    pub(crate) name: String,
    state: Mutex<PeerState>,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) streams: AtomicI64,
    pub(crate) punches_ok: AtomicU64,
    pub(crate) punches_failed: AtomicU64,
    pub(crate) punch_attempts: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PeerStatus {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: Mutex::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            streams: AtomicI64::new(0),
            punches_ok: AtomicU64::new(0),
            punches_failed: AtomicU64::new(0),
            punch_attempts: AtomicU64::new(0),
        }
    }

    /// Changes the non-counter state.
    pub(crate) fn update(&self, f: impl FnOnce(&mut PeerState)) {
        f(&mut lock(&self.state));
    }

    /// A copy of the non-counter state.
    pub(crate) fn state(&self) -> PeerState {
        lock(&self.state).clone()
    }

    /// Records a finished punch.
    pub(crate) fn record_punch(&self, punch: LastPunch) {
        let ok = punch.result == "ok";
        if ok {
            &self.punches_ok
        } else {
            &self.punches_failed
        }
        .fetch_add(1, Ordering::Relaxed);
        self.punch_attempts
            .fetch_add(u64::from(punch.attempts), Ordering::Relaxed);
        self.update(|s| s.last_punch = Some(punch));
    }

    fn doc(&self) -> PeerDoc {
        let s = self.state();
        PeerDoc {
            name: self.name.clone(),
            path: s.path,
            transport: s.transport,
            remote_addr: s.remote.map(|a| a.to_string()),
            family: s.remote.map(|a| {
                if a.ip().to_canonical().is_ipv6() {
                    "ipv6"
                } else {
                    "ipv4"
                }
                .to_owned()
            }),
            rtt_ms: s.rtt_ms,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            last_punch: s.last_punch,
            punches_ok: self.punches_ok.load(Ordering::Relaxed),
            punches_failed: self.punches_failed.load(Ordering::Relaxed),
            path_kept: s.path_kept,
        }
    }
}

/// Live status of one forward.
#[derive(Debug)]
pub struct ForwardStatus {
    pub(crate) listen: Mutex<String>,
    pub(crate) peer: String,
    pub(crate) service: String,
    pub(crate) active: AtomicI64,
    pub(crate) total: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) protocol: &'static str,
    pub(crate) datagrams_out: AtomicU64,
    pub(crate) datagrams_in: AtomicU64,
    /// Shared with the QUIC datagram routes of this forward's flows.
    pub(crate) datagrams_dropped: Arc<AtomicU64>,
}

impl ForwardStatus {
    pub(crate) fn new(listen: &str, peer: &str, service: &str) -> Self {
        Self {
            listen: Mutex::new(listen.to_owned()),
            peer: peer.to_owned(),
            service: service.to_owned(),
            active: AtomicI64::new(0),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            protocol: "tcp",
            datagrams_out: AtomicU64::new(0),
            datagrams_in: AtomicU64::new(0),
            datagrams_dropped: Arc::default(),
        }
    }

    /// The status of a UDP forward.
    pub(crate) fn udp(mut self) -> Self {
        self.protocol = "udp";
        self
    }

    fn doc(&self) -> ForwardDoc {
        ForwardDoc {
            listen: lock(&self.listen).clone(),
            peer: self.peer.clone(),
            service: self.service.clone(),
            active: self.active.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            protocol: self.protocol.to_owned(),
            datagrams_out: self.datagrams_out.load(Ordering::Relaxed),
            datagrams_in: self.datagrams_in.load(Ordering::Relaxed),
            datagrams_dropped: self.datagrams_dropped.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct RendezvousState {
    connected: bool,
    public_addr: Option<SocketAddr>,
    public_udp_addr: Option<SocketAddr>,
    public_addr6: Option<SocketAddr>,
    punch_port: u16,
    url: Option<String>,
}

/// Everything `punchd status` shows.
#[derive(Debug)]
pub struct StatusBoard {
    name: String,
    rendezvous: Mutex<RendezvousState>,
    /// The QUIC endpoint, for its connection count.
    quic: Mutex<Option<quinn::Endpoint>>,
    /// Replaced whole by a config reload.
    peers: Mutex<Vec<Arc<PeerStatus>>>,
    forwards: Mutex<Vec<Arc<ForwardStatus>>>,
    /// Punch orders refused because the pinned server key did not sign them.
    pub(crate) orders_refused: AtomicU64,
    /// Punch orders that arrived after their firing time.
    pub(crate) orders_late: AtomicU64,
    /// Inputs refused or trimmed by a limit (README, "Limits"), by reason.
    pub(crate) limits: LimitCounters,
    /// The port mapper's state and counters.
    pub(crate) portmap: Arc<crate::portmap::Board>,
    /// NAT discovery's latest result and counters.
    pub(crate) nat: Arc<crate::nat::Board>,
    /// Config reloads applied and refused (`punchd_reloads_total`).
    pub(crate) reloads: [AtomicU64; 2],
}

/// A limit that refused (or trimmed) something from the network: the
/// `reason` label of `punchd_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// A punch order had more candidates than [`crate::control::order::MAX_CANDIDATES`].
    Candidates,
    /// A candidate no order may aim at (unspecified, multicast, port 0, a
    /// second port among the local ones).
    CandidateAddress,
    /// A punch order for a peer came sooner than the order budget allows.
    OrderRate,
    /// A punch order whose `at` was too far ahead was brought forward.
    OrderTooFarAhead,
    /// A candidate that is not the peer's: off its public IP, and it is
    /// not behind our own NAT ([`crate::control::order::keep_peer_addresses`]).
    CandidateNotPeer,
}

impl Limit {
    const ALL: [Limit; 5] = [
        Limit::Candidates,
        Limit::CandidateAddress,
        Limit::OrderRate,
        Limit::OrderTooFarAhead,
        Limit::CandidateNotPeer,
    ];

    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::Candidates => "candidates",
            Limit::CandidateAddress => "candidate_address",
            Limit::OrderRate => "order_rate",
            Limit::OrderTooFarAhead => "order_too_far_ahead",
            Limit::CandidateNotPeer => "candidate_not_peer",
        }
    }
}

/// One counter per [`Limit`].
#[derive(Debug, Default)]
pub(crate) struct LimitCounters([AtomicU64; Limit::ALL.len()]);

impl LimitCounters {
    /// Counts one refusal.
    pub(crate) fn hit(&self, limit: Limit) {
        self.0[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count, in a fixed order.
    pub(crate) fn all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Limit::ALL
            .iter()
            .map(|l| (l.as_str(), self.0[*l as usize].load(Ordering::Relaxed)))
    }
}

impl StatusBoard {
    /// Counts a punch order refused for its signature.
    pub(crate) fn order_refused(&self) {
        self.orders_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a punch order that arrived after its firing time.
    pub(crate) fn order_late(&self) {
        self.orders_late.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn new(
        name: &str,
        peers: Vec<Arc<PeerStatus>>,
        forwards: Vec<Arc<ForwardStatus>>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            rendezvous: Mutex::default(),
            quic: Mutex::default(),
            peers: Mutex::new(peers),
            forwards: Mutex::new(forwards),
            orders_refused: AtomicU64::new(0),
            orders_late: AtomicU64::new(0),
            limits: LimitCounters::default(),
            portmap: Arc::default(),
            nat: Arc::default(),
            reloads: Default::default(),
        }
    }

    pub(crate) fn set_rendezvous(
        &self,
        connected: bool,
        public_addr: Option<SocketAddr>,
        punch_port: u16,
    ) {
        let mut r = lock(&self.rendezvous);
        r.connected = connected;
        if public_addr.is_some() {
            r.public_addr = public_addr;
        }
        if punch_port != 0 {
            r.punch_port = punch_port;
        }
    }

    /// Counts a reload: applied (`true`) or refused.
    pub(crate) fn reloaded(&self, applied: bool) {
        self.reloads[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    }

    /// The peers now configured.
    pub(crate) fn peers(&self) -> Vec<Arc<PeerStatus>> {
        lock(&self.peers).clone()
    }

    /// After a reload: the peers and forwards now configured.
    pub(crate) fn replace(&self, peers: Vec<Arc<PeerStatus>>, forwards: Vec<Arc<ForwardStatus>>) {
        *lock(&self.peers) = peers;
        *lock(&self.forwards) = forwards;
    }

    /// The instance the rendezvous client uses now.
    pub(crate) fn set_rendezvous_url(&self, url: &str) {
        lock(&self.rendezvous).url = Some(url.to_owned());
    }

    pub(crate) fn set_quic_endpoint(&self, endpoint: quinn::Endpoint) {
        *lock(&self.quic) = Some(endpoint);
    }

    /// Records our IPv6 endpoint as the rendezvous saw it (`None`: not
    /// reached over IPv6 on this registration).
    pub(crate) fn set_public_addr6(&self, addr: Option<SocketAddr>) {
        lock(&self.rendezvous).public_addr6 = addr;
    }

    /// Records our UDP endpoint; true if it changed.
    pub(crate) fn set_public_udp(&self, addr: SocketAddr) -> bool {
        let mut r = lock(&self.rendezvous);
        r.public_udp_addr.replace(addr) != Some(addr)
    }

    /// The status document.
    pub fn snapshot(&self) -> StatusDoc {
        let r = lock(&self.rendezvous);
        StatusDoc {
            name: self.name.clone(),
            public_addr: r.public_addr.map(|a| a.to_string()),
            public_addr6: r.public_addr6.map(|a| a.to_string()),
            rendezvous: if r.connected {
                "connected"
            } else {
                "disconnected"
            }
            .to_owned(),
            rendezvous_url: r.url.clone(),
            punch_port: r.punch_port,
            public_udp_addr: r.public_udp_addr.map(|a| a.to_string()),
            quic_connections: lock(&self.quic)
                .as_ref()
                .map(quinn::Endpoint::open_connections),
            port_mapping: self.portmap.doc(),
            nat: self.nat.doc().map(|mut n| {
                n.port_mapping = self.portmap.doc().answered;
                n
            }),
            peers: self.peers().iter().map(|p| p.doc()).collect(),
            forwards: lock(&self.forwards).iter().map(|f| f.doc()).collect(),
        }
    }

    /// Prometheus text for `/metrics` (written in `admin/metrics.rs`).
    pub fn render_metrics(&self) -> String {
        super::metrics::render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_json() {
        for p in [PathState::Direct, PathState::Relayed, PathState::None] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for t in [Transport::Tcp, Transport::Quic, Transport::Relay] {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    #[test]
    fn snapshot_matches_the_documented_shape() {
        let peer = Arc::new(PeerStatus::new("bob"));
        peer.update(|s| {
            s.path = PathState::Direct;
            s.transport = Some(Transport::Tcp);
            s.remote = Some("203.0.113.3:40000".parse().unwrap());
            s.rtt_ms = Some(0.8);
        });
        peer.record_punch(LastPunch {
            result: "ok".into(),
            elapsed_ms: 12,
            attempts: 1,
            reason: None,
            finished_unix_ms: 1,
        });
        let fwd = Arc::new(ForwardStatus::new("127.0.0.1:2222", "bob", "ssh"));
        let board = StatusBoard::new("alice", vec![peer], vec![fwd]);
        board.set_rendezvous(true, Some("203.0.113.2:40000".parse().unwrap()), 40000);
        let v = serde_json::to_value(board.snapshot()).unwrap();
        assert_eq!(v["name"], "alice");
        assert_eq!(v["public_addr"], "203.0.113.2:40000");
        assert_eq!(v["rendezvous"], "connected");
        let p = &v["peers"][0];
        assert_eq!(p["path"], "direct");
        assert_eq!(p["transport"], "tcp");
        assert_eq!(p["remote_addr"], "203.0.113.3:40000");
        assert_eq!(p["family"], "ipv4");
        assert_eq!(v["public_addr6"], serde_json::Value::Null);
        board.set_public_addr6(Some("[2001:db8::2]:40000".parse().unwrap()));
        let v = serde_json::to_value(board.snapshot()).unwrap();
        assert_eq!(v["public_addr6"], "[2001:db8::2]:40000");
        assert_eq!(p["last_punch"]["result"], "ok");
        assert_eq!(p["last_punch"]["reason"], serde_json::Value::Null);
        for key in ["rtt_ms", "bytes_in", "bytes_out", "streams"] {
            assert!(p.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["forwards"][0]["service"], "ssh");
        assert_eq!(v["forwards"][0]["active"], 0);
        let m = board.render_metrics();
        assert!(
            m.contains("punchd_peer_path{peer=\"bob\",path=\"direct\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("punchd_punches_total{peer=\"bob\",result=\"ok\"} 1"),
            "{m}"
        );
        // A sample without labels is written without braces (the writer in
        // punch-service); `{}` before it meant the same to Prometheus.
        assert!(m.contains("punchd_rendezvous_connected 1"), "{m}");
        for (transport, on) in [("tcp", 1), ("quic", 0), ("relay", 0)] {
            let line =
                format!("punchd_peer_transport{{peer=\"bob\",transport=\"{transport}\"}} {on}");
            assert!(m.contains(&line), "{line} not in {m}");
        }
        assert!(
            m.contains("punchd_peer_path{peer=\"bob\",path=\"none\"} 0"),
            "{m}"
        );
    }
}
