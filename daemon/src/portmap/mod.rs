//! Port mapping: ask the default gateway to map the punch port (TCP and
//! UDP) with PCP, NAT-PMP or UPnP IGD, keep the mapping renewed, remove it
//! on a clean exit, and hand the mapped endpoints to the rendezvous link,
//! which offers them to peers as candidates.
//!
//! A mapping makes this side reachable on a known public endpoint even
//! where the router's NAT randomizes ports, so a direct path exists where
//! there would otherwise only be the relay. [`plan`] decides (sans IO),
//! [`proto`] speaks the protocols through `crab_nat` and `igd-next`,
//! [`gateway`] finds the router; this file is the task around them.
//!
//! The router is untrusted: only the punch port (and the QUIC path's UDP
//! port) is ever mapped, to this host; what a mapping lets in still meets
//! the tunnel's mutual authentication and `[[expose]]`'s allow lists.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub(crate) mod gateway;
pub(crate) mod plan;
pub(crate) mod proto;

use plan::{Action, Grant, Plan, Protocol};
use proto::{Held, MapError, Ports, Target, PROBE_TIMEOUT};

/// `port_mapping` in the status document (DESIGN.md, "Port mapping").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMappingDoc {
    /// `upnp`, `nat-pmp`, `pcp`, or null when nothing is mapped.
    pub protocol: Option<String>,
    /// The mapped TCP endpoint (`ip:port`).
    pub external_tcp: Option<String>,
    /// The mapped UDP endpoint (`ip:port`), for the QUIC path.
    pub external_udp: Option<String>,
    /// When the lease runs out unless renewed (renewal is due at half).
    pub expires_unix_ms: Option<u64>,
    /// The protocols the gateway answered in the last probe.
    #[serde(default)]
    pub answered: Vec<String>,
}

/// What the mapper publishes to the rendezvous link and the status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// A first probe has finished (or mapping is off): registering need
    /// not wait any longer.
    pub(crate) settled: bool,
    pub(crate) grant: Option<Grant>,
    pub(crate) expires_unix_ms: Option<u64>,
    pub(crate) answered: Vec<Protocol>,
}

/// Counters by protocol, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// [protocol][kind]: kinds are probes, mappings, renewals, failures.
    n: [[AtomicU64; 4]; 3],
}

/// Which counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    Probe = 0,
    Mapping = 1,
    Renewal = 2,
    Failure = 3,
}

impl Counters {
    fn add(&self, p: Protocol, c: Count) {
        self.n[p as usize][c as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(protocol, [probes, mappings, renewals, failures])` for each protocol.
    pub(crate) fn all(&self) -> impl Iterator<Item = (&'static str, [u64; 4])> + '_ {
        Protocol::ALL.iter().map(|p| {
            let row = &self.n[*p as usize];
            (
                p.as_str(),
                std::array::from_fn(|i| row[i].load(Ordering::Relaxed)),
            )
        })
    }
}

/// Shared between the mapper task, the status board and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Board {
    snapshot: Mutex<Snapshot>,
    pub(crate) counters: Counters,
}

impl Board {
    pub(crate) fn doc(&self) -> PortMappingDoc {
        let s = self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        PortMappingDoc {
            protocol: s.grant.map(|g| g.protocol.as_str().to_owned()),
            external_tcp: s.grant.map(|g| g.external_tcp.to_string()),
            external_udp: s.grant.and_then(|g| g.external_udp).map(|a| a.to_string()),
            expires_unix_ms: s.expires_unix_ms,
            answered: s.answered.iter().map(|p| p.as_str().to_owned()).collect(),
        }
    }

    fn set(&self, s: Snapshot) {
        *self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = s;
    }
}

enum Cmd {
    /// Our LAN address toward the rendezvous, and the ports to map.
    Start {
        local: Ipv4Addr,
        ports: Ports,
    },
    TunnelLost,
}

/// The handle the rendezvous link and the peers hold.
#[derive(Debug, Clone)]
pub(crate) struct PortMapper {
    cmds: Option<mpsc::Sender<Cmd>>,
    state: watch::Receiver<Snapshot>,
    /// A probe was asked for (so a first registration may wait for it).
    asked: bool,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Start { local, ports } => write!(f, "Start({local}, {ports:?})"),
            Cmd::TunnelLost => write!(f, "TunnelLost"),
        }
    }
}

impl PortMapper {
    /// Mapping off: settled at once, never a grant, nothing sent anywhere.
    pub(crate) fn disabled() -> Self {
        let (_tx, rx) = watch::channel(Snapshot {
            settled: true,
            ..Snapshot::default()
        });
        Self {
            cmds: None,
            state: rx,
            asked: false,
        }
    }

    /// Starts the mapper task (it does nothing until [`Self::start`]).
    pub(crate) fn spawn(
        board: Arc<Board>,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(8);
        let (state_tx, state_rx) = watch::channel(Snapshot::default());
        tracker.spawn(run(rx, state_tx, board, cancel));
        Self {
            cmds: Some(tx),
            state: state_rx,
            asked: false,
        }
    }

    /// The punch port is bound and `local` is our address toward the
    /// rendezvous. A loopback or IPv6 address means no IPv4 gateway lies
    /// between us and it: then nothing is probed (and nothing waited for).
    pub(crate) fn start(&mut self, local: SocketAddr, tcp_port: u16, udp_port: Option<u16>) {
        let Some(tx) = &self.cmds else { return };
        let (IpAddr::V4(ip), Some(tcp)) = (local.ip(), NonZeroU16::new(tcp_port)) else {
            return;
        };
        if ip.is_loopback() || ip.is_unspecified() {
            debug!(%local, "port mapping: the rendezvous is reached without a gateway; not probing");
            return;
        }
        let ports = Ports {
            tcp,
            udp: udp_port.and_then(NonZeroU16::new),
        };
        if tx.try_send(Cmd::Start { local: ip, ports }).is_ok() {
            self.asked = true;
        }
    }

    /// A tunnel was lost: the router may have forgotten the mapping.
    pub(crate) fn tunnel_lost(&self) {
        if let Some(tx) = &self.cmds {
            let _ = tx.try_send(Cmd::TunnelLost);
        }
    }

    /// The mapping now, waiting up to `budget` for a first probe to finish
    /// (when one was asked for: a host that will not probe, e.g. one that
    /// reaches the rendezvous over loopback, does not wait).
    pub(crate) async fn settled(&mut self, budget: Duration) -> Option<Grant> {
        if self.asked {
            let _ = tokio::time::timeout(budget, self.state.wait_for(|s| s.settled)).await;
        }
        self.current()
    }

    /// The mapping now.
    pub(crate) fn current(&self) -> Option<Grant> {
        self.state.borrow().grant
    }

    /// Resolves once the mapped endpoints differ from `sent` (what the
    /// rendezvous was told); never, when mapping is off.
    pub(crate) async fn differs_from(&mut self, sent: (Option<SocketAddr>, Option<SocketAddr>)) {
        loop {
            if endpoints(self.current()) != sent {
                return;
            }
            if self.cmds.is_none() || self.state.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// The part of a grant the candidates carry.
pub(crate) fn endpoints(g: Option<Grant>) -> (Option<SocketAddr>, Option<SocketAddr>) {
    match g {
        Some(g) => (Some(g.external_tcp), g.external_udp),
        None => (None, None),
    }
}

fn unix_ms_after(d: Duration) -> u64 {
    (SystemTime::now() + d)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_millis() as u64)
}

/// Where PCP and NAT-PMP routers announce a restart or a new address
/// (RFC 6887 §14.1.3, RFC 6886 §3.2.1): `224.0.0.1:5350`.
const ANNOUNCE_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
const ANNOUNCE_PORT: u16 = 5350;
/// Announcements acted on at most this often (a chatty or hostile LAN
/// device cannot make us renew in a loop).
const ANNOUNCE_MIN_GAP: Duration = Duration::from_secs(5);

/// A socket for the gateway's restart announcements, joined on our LAN
/// address. A router that restarted has forgotten our mapping; hearing it
/// say so lets us map again at once, before the peer's packets meet the
/// bare router and leave conntrack entries that would shadow the mapping.
fn announce_socket(local: Ipv4Addr) -> Option<tokio::net::UdpSocket> {
    let open = || -> std::io::Result<tokio::net::UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, ANNOUNCE_PORT)).into())?;
        s.join_multicast_v4(&ANNOUNCE_GROUP, &local)?;
        tokio::net::UdpSocket::from_std(s.into())
    };
    match open() {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(error = %e, "port mapping: not listening for router announcements");
            None
        }
    }
}

/// The next datagram on `sock` (pending forever without one). Only the
/// sender matters: the content is not parsed, so no reply can be junk.
async fn announced(sock: Option<&tokio::net::UdpSocket>) -> Option<SocketAddr> {
    let Some(s) = sock else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf).await.ok().map(|(_, from)| from)
}

/// The mapper task.
async fn run(
    mut cmds: mpsc::Receiver<Cmd>,
    state: watch::Sender<Snapshot>,
    board: Arc<Board>,
    cancel: CancellationToken,
) {
    let mut plan = Plan::new();
    let mut target: Option<Target> = None;
    let mut held: Option<Held> = None;
    let mut answered: Vec<Protocol> = Vec::new();
    let mut settled = false;
    let mut announce: Option<tokio::net::UdpSocket> = None;
    let mut last_announce: Option<Instant> = None;
    let mut action = Action::WaitUntil(Instant::now() + plan::REPROBE_IDLE);
    loop {
        action = match action {
            Action::Probe => {
                let Some(t) = target else {
                    action = plan.tick(Instant::now());
                    continue;
                };
                if let Some(old) = held.take() {
                    // Whatever we held is stale (another gateway, or refused twice).
                    let _ = proto::remove(old).await;
                }
                let started = Instant::now();
                let (got, heard) = probe(t, &board).await;
                answered = heard;
                match &got {
                    Some(h) => {
                        let g = h.grant();
                        info!(protocol = g.protocol.as_str(), external_tcp = %g.external_tcp,
                              external_udp = ?g.external_udp, lease_s = g.lease.as_secs(),
                              probe_ms = started.elapsed().as_millis() as u64, "port mapped by the gateway");
                    }
                    None if answered.is_empty() => {
                        debug!(gateway = %t.gateway, probe_ms = started.elapsed().as_millis() as u64,
                               "port mapping: no UPnP, NAT-PMP or PCP on the gateway");
                    }
                    None => {}
                }
                let grant = got.as_ref().map(Held::grant);
                held = got;
                settled = true;
                plan.probed(Instant::now(), grant)
            }
            Action::Renew(p) => match (held.as_mut(), target) {
                (Some(h), Some(t)) => {
                    let before = h.grant();
                    let r = proto::renew(h, t).await;
                    match r {
                        Ok(()) => {
                            board.counters.add(p, Count::Renewal);
                            let g = h.grant();
                            if endpoints(Some(g)) != endpoints(Some(before)) {
                                info!(protocol = p.as_str(), external_tcp = %g.external_tcp, external_udp = ?g.external_udp, "port mapping renewed on another external endpoint");
                            } else {
                                debug!(protocol = p.as_str(), "port mapping renewed");
                            }
                            plan.renewed(Instant::now(), Some(g))
                        }
                        Err(e) => {
                            board.counters.add(p, Count::Failure);
                            warn!(protocol = p.as_str(), error = %e, "port mapping renewal failed");
                            let next = plan.renewed(Instant::now(), None);
                            if plan.grant().is_none() {
                                held = None;
                            }
                            next
                        }
                    }
                }
                _ => plan.renewed(Instant::now(), None),
            },
            Action::WaitUntil(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => plan.tick(Instant::now()),
                    cmd = cmds.recv() => match cmd {
                        Some(Cmd::Start { local, ports }) => {
                            let gw = gateway::default_gateway();
                            let fresh = target.map(|t| (t.gateway, t.local, t.ports)) != gw.map(|g| (g, local, ports));
                            match gw {
                                None => {
                                    debug!("port mapping: no default IPv4 gateway; not probing");
                                    settled = true;
                                    target = None;
                                    plan.tick(Instant::now())
                                }
                                Some(g) if fresh => {
                                    let had = target.is_some();
                                    announce = announce_socket(local);
                                    target = Some(Target { gateway: g, local, ports, external: None });
                                    if had { plan.gateway_changed(Instant::now()) } else { plan.start(Instant::now()) }
                                }
                                Some(_) => plan.tick(Instant::now()),
                            }
                        }
                        Some(Cmd::TunnelLost) => {
                            let now = Instant::now();
                            match (target, gateway::default_gateway()) {
                                (Some(t), Some(g)) if t.gateway != g => {
                                    info!(old = %t.gateway, new = %g, "default gateway changed; probing the new one");
                                    target = Some(Target { gateway: g, external: None, ..t });
                                    plan.gateway_changed(now)
                                }
                                (Some(_), _) => plan.tunnel_lost(now),
                                (None, _) => plan.tick(now),
                            }
                        }
                        // The rendezvous client is gone: the daemon is
                        // stopping. (Waiting here instead would hold this
                        // task past shutdown: the select has already chosen
                        // this arm, so `cancel` is no longer watched.)
                        None => break,
                    },
                    Some(from) = announced(announce.as_ref()) => {
                        let now = Instant::now();
                        let from_gateway = target.is_some_and(|t| from.ip() == IpAddr::V4(t.gateway));
                        let due = last_announce.is_none_or(|t| now.saturating_duration_since(t) >= ANNOUNCE_MIN_GAP);
                        if from_gateway && due {
                            last_announce = Some(now);
                            // A fresh external port: see `Plan::router_restarted`.
                            if let Some(t) = target.as_mut() {
                                t.external = proto::fresh_external(t.ports.tcp);
                            }
                            info!(%from, external_port = ?target.and_then(|t| t.external), "the gateway announced a restart or a new address; mapping again on a fresh external port");
                            plan.router_restarted(now)
                        } else {
                            plan.tick(now)
                        }
                    }
                    _ = cancel.cancelled() => break,
                }
            }
        };
        let grant = plan.grant();
        let snap = Snapshot {
            settled,
            grant,
            expires_unix_ms: match plan.state() {
                plan::State::Mapped { expires, .. } => Some(unix_ms_after(
                    expires.saturating_duration_since(Instant::now()),
                )),
                _ => None,
            },
            answered: answered.clone(),
        };
        board.set(snap.clone());
        state.send_if_modified(|s| {
            let changed = *s != snap;
            *s = snap;
            changed
        });
    }
    // Clean exit: leave nothing open on the router.
    if let Some(h) = held {
        let p = h.protocol();
        match proto::remove(h).await {
            Ok(()) => info!(protocol = p.as_str(), "port mapping removed"),
            Err(e) => {
                warn!(protocol = p.as_str(), error = %e, "could not remove the port mapping; it lapses with its lease")
            }
        }
    }
}

/// All three protocols at once; the first decisive answer wins (PCP over
/// NAT-PMP over UPnP: both UDP protocols are one round trip, and their
/// replies name the external port exactly). Returns the mapping made,
/// if any, and which protocols answered at all.
async fn probe(t: Target, board: &Board) -> (Option<Held>, Vec<Protocol>) {
    for p in Protocol::ALL {
        board.counters.add(p, Count::Probe);
    }
    let mut pcp = pin!(proto::map_pcp(t, PROBE_TIMEOUT));
    let mut pmp = pin!(proto::natpmp_address(t, PROBE_TIMEOUT));
    let mut upnp = pin!(proto::upnp_search(t, PROBE_TIMEOUT));
    let (mut r_pcp, mut r_pmp, mut r_upnp) = (None, None, None);
    loop {
        // Decide as soon as the better protocols have said no.
        match (&r_pcp, &r_pmp, &r_upnp) {
            (Some(Ok(_)), _, _) | (Some(Err(_)), Some(_), Some(_)) => break,
            (Some(Err(_)), Some(Ok(_)), _) => break,
            _ => {}
        }
        tokio::select! {
            r = &mut pcp, if r_pcp.is_none() => r_pcp = Some(r),
            r = &mut pmp, if r_pmp.is_none() => r_pmp = Some(r),
            r = &mut upnp, if r_upnp.is_none() => r_upnp = Some(r),
        }
    }
    let mut answered = Vec::new();
    let mut note = |p: Protocol, r: Result<(), &MapError>| match r {
        Ok(()) => answered.push(p),
        Err(e) if e.answered() => {
            answered.push(p);
            board.counters.add(p, Count::Failure);
            info!(protocol = p.as_str(), error = %e, "the gateway answered but gave no mapping");
        }
        Err(e) => debug!(protocol = p.as_str(), error = %e, "no answer"),
    };
    let pcp = r_pcp.unwrap_or(Err(MapError::Timeout(PROBE_TIMEOUT)));
    note(Protocol::Pcp, pcp.as_ref().map(|_| ()));
    if let Some(r) = &r_pmp {
        note(Protocol::NatPmp, r.as_ref().map(|_| ()));
    }
    if let Some(r) = &r_upnp {
        note(Protocol::Upnp, r.as_ref().map(|_| ()));
    }
    let made = match (pcp, r_pmp, r_upnp) {
        (Ok(h), _, _) => Ok(h),
        (_, Some(Ok(ip)), _) => proto::map_natpmp(t, ip, Duration::from_secs(2))
            .await
            .map_err(|e| (Protocol::NatPmp, e)),
        (_, _, Some(Ok(gw))) => proto::map_upnp(t, gw, Duration::from_secs(2))
            .await
            .map_err(|e| (Protocol::Upnp, e)),
        _ => return (None, answered),
    };
    match made {
        Ok(h) => {
            board.counters.add(h.protocol(), Count::Mapping);
            (Some(h), answered)
        }
        Err((p, e)) => {
            board.counters.add(p, Count::Failure);
            info!(protocol = p.as_str(), error = %e, "the gateway refused the port mapping; punching without it");
            (None, answered)
        }
    }
}

/// Which protocols the default gateway answers, for `punchd netcheck`
/// (no daemon, nothing kept): the port mapper's three probes at once, each
/// bounded by [`PROBE_TIMEOUT`]. PCP's probe is a mapping request, so a
/// mapping it grants for `port` is removed at once.
pub(crate) async fn gateway_answers(local: Ipv4Addr, port: u16) -> Vec<String> {
    let (Some(gateway), Some(tcp)) = (gateway::default_gateway(), NonZeroU16::new(port)) else {
        return Vec::new();
    };
    let t = Target {
        gateway,
        local,
        ports: Ports { tcp, udp: None },
        external: None,
    };
    let (pcp, pmp, upnp) = tokio::join!(
        proto::map_pcp(t, PROBE_TIMEOUT),
        proto::natpmp_address(t, PROBE_TIMEOUT),
        proto::upnp_search(t, PROBE_TIMEOUT),
    );
    let heard = |r: Result<(), &MapError>| r.is_ok() || r.is_err_and(MapError::answered);
    let mut answered = Vec::new();
    if heard(upnp.as_ref().map(|_| ())) {
        answered.push(Protocol::Upnp.as_str().to_owned());
    }
    if heard(pmp.as_ref().map(|_| ())) {
        answered.push(Protocol::NatPmp.as_str().to_owned());
    }
    if heard(pcp.as_ref().map(|_| ())) {
        answered.push(Protocol::Pcp.as_str().to_owned());
    }
    if let Ok(held) = pcp {
        let _ = proto::remove(held).await;
    }
    answered
}

#[cfg(test)]
mod tests;
