//! The daemon's side of the rendezvous: one WebSocket, opened *from the
//! punch port*, kept alive with pings, reopened with backoff when it drops.
//!
//! Opening it from the punch port is the point: the server reports the NAT
//! mapping of that port as our public endpoint, which is exactly the mapping
//! the punch will reuse, and the pings keep it from expiring.
//!
//! In: [`RvCmd`] (connect to a peer, report a result). Out: [`RvEvent`]
//! (registered, punch orders as [`PunchJob`]s, refusals).
//!
//! Also here: [`clock`] (server time → local instant, for the punch's `at`),
//! [`url`] and [`link`] (the rendezvous URL → where to connect, and the
//! plain or TLS link over the dialled socket, shared with the relayed
//! fallback, which imports them from here).
//!
//! Punch orders are the one server message that makes the daemon send
//! packets somewhere. With `[rendezvous] server_key` pinned, an order is
//! acted on only if the server's signature over it, our name and this
//! registration's nonce verifies ([`check_order`]); anything else is
//! logged, counted (`punchd_orders_refused_total`) and dropped.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use futures::{SinkExt as _, StreamExt as _};
use punch_config::Secret;
use punch_rendezvous::protocol::{
    b64, decode_nonce, sign_challenge, unix_time_us, verify_order, ClientMsg, ErrorCode, Hello,
    OrderError, PunchResult, ServerMsg, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub(crate) mod clock;
pub(crate) mod failover;
pub(crate) mod link;
pub mod netcheck;
pub(crate) mod order;
pub(crate) mod url;

use clock::ClockSync;
use failover::{Ended, Failover};
use link::{Endpoint, LinkError, RvStream};
use order::OrderGate;
use punch_rendezvous::protocol::PunchOrder;
use url::UrlError;

use crate::admin::status::{Limit, StatusBoard};
use crate::identity::Identity;
use crate::portmap::{self, PortMapper};
use crate::punch::{bind_punch_socket, family, set_abortive_close};
use crate::quic::probe::Prober;
use crate::quic::QuicPath;

/// Steady-state ping interval (also the NAT keepalive for the punch port).
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Quick pings right after registering, for a clock estimate before the
/// first punch.
const QUICK_PINGS: u32 = 4;
/// After a [`RvCmd::Probe`], pings this often for [`WATCHFUL_FOR`].
const WATCHFUL_PING: Duration = Duration::from_secs(1);
/// How long pings stay frequent after a tunnel was lost.
const WATCHFUL_FOR: Duration = Duration::from_secs(10);
/// No pong for this long means the connection is dead.
const PONG_TIMEOUT: Duration = Duration::from_secs(35);
/// How long registration waits for the first UDP probe's ack.
const UDP_WAIT: Duration = Duration::from_secs(1);
/// How long the first registration waits for the port mapper's first
/// probe (its own budget is 1 s; a LAN without a router answers sooner).
const PORTMAP_WAIT: Duration = Duration::from_millis(1200);
/// Time allowed for the observe-only hello over the other family.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(3);
/// This host's IPv6 addresses, with their scope and flags.
const IF_INET6: &str = "/proc/net/if_inet6";
/// This host's IPv4 routes (main table), for [`family::has_ipv4_route`].
const IPV4_ROUTES: &str = "/proc/net/route";
/// Time allowed to connect and register.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A punch to perform, as the rendezvous client hands it to a peer task.
#[derive(Debug)]
pub(crate) struct PunchJob {
    pub(crate) order: PunchOrder,
    /// `order.at_us` on our clock.
    pub(crate) fire_at: Instant,
    /// Local punch port.
    pub(crate) port: u16,
    /// When the order arrived, for the elapsed time.
    pub(crate) received: Instant,
    /// The instance that sent the order (the daemon may have failed over
    /// since it started): where the relay is joined unless the order's
    /// `relay_url` names another (see [`crate::fallback::connect`]).
    pub(crate) relay: Endpoint,
}

/// Commands for the rendezvous client.
#[derive(Debug)]
pub(crate) enum RvCmd {
    /// Ask for a punch with this peer.
    Connect(String),
    /// Report a punch outcome.
    Report(PunchResult),
    /// Ping now, and every second for a while: a tunnel was just lost, and
    /// whatever broke it (a NAT that forgot its mappings, say) may have
    /// broken this connection too. Finding out soon, not at the next
    /// scheduled ping, is what lets the next punch order reach us. One ping
    /// is not enough: after a NAT lost its state, the server's next packet
    /// to us meets no mapping and the NAT resets the server's side, while
    /// ours learns of it only when it next sends (measured in the lab's
    /// `conntrack -F` test: our ping right after the tunnel broke still
    /// got its pong, the server dropped us 0.4 s later, and we noticed at
    /// the next regular ping, 10 s on).
    Probe,
}

/// What the rendezvous client tells the daemon.
#[derive(Debug)]
pub(crate) enum RvEvent {
    /// Registered (again).
    Up,
    /// A punch order, converted to our clock.
    Punch(Box<PunchJob>),
    /// The other side of a session went away before punching.
    Aborted { session: String, peer: String },
    /// The server refused something we asked.
    Refused { code: ErrorCode, message: String },
}

/// Why a session with the server ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RvError {
    /// The URL is not usable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// TLS to the rendezvous failed (an untrusted certificate, say).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The host name does not resolve.
    #[error("rendezvous url {0:?}: host does not resolve")]
    Unresolved(String),
    /// Network trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// WebSocket trouble.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server said no.
    #[error("server refused: {code}: {message}", code = code.as_str())]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server broke the protocol or went quiet.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Static settings.
#[derive(Debug, Clone)]
pub(crate) struct RvSettings {
    /// The instance in use (one of `endpoints`).
    pub(crate) endpoint: Endpoint,
    /// `[rendezvous] urls` (or `url` alone), in failover order.
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) token: Option<Secret>,
    /// `[rendezvous] server_key`: when set, only orders it signed count.
    pub(crate) server_key: Option<VerifyingKey>,
    pub(crate) name: String,
    pub(crate) identity: Identity,
    /// 0 until the first connection picks one.
    pub(crate) port: u16,
    pub(crate) local_candidates: bool,
    /// The QUIC path's UDP socket, to announce and probe from.
    pub(crate) quic: Option<Arc<QuicPath>>,
    /// The router's mapping of the punch port, announced in the hello.
    pub(crate) portmap: PortMapper,
    /// NAT discovery, run before a registration when due; announced in
    /// the hello.
    pub(crate) nat: netcheck::NatCheck,
}

/// What registration returned.
struct Registered {
    ws: Ws,
    observed: SocketAddr,
    /// The server's UDP observation endpoint, if it runs one.
    udp_server: Option<SocketAddr>,
    nonce: [u8; 32],
    /// The mapped endpoints the hello announced.
    mapped: (Option<SocketAddr>, Option<SocketAddr>),
    /// The rendezvous at an address of the other family, when its name
    /// or literal resolved to both: where the observe-only hello goes.
    other: Option<SocketAddr>,
    /// The families this host can aim candidates at.
    reach: family::Reach,
}

/// Runs until cancelled: connect, register, serve, reconnect.
pub(crate) async fn run(
    mut settings: RvSettings,
    events: mpsc::Sender<RvEvent>,
    mut cmds: mpsc::Receiver<RvCmd>,
    status: Arc<StatusBoard>,
    cancel: CancellationToken,
) {
    let mut failover = Failover::new(settings.endpoints.len());
    // Outlives each registration, so a server cannot refill it by reconnecting us.
    let mut gate = OrderGate::default();
    loop {
        if let Some(e) = settings.endpoints.get(failover.current()) {
            settings.endpoint = e.clone();
        }
        status.set_rendezvous_url(settings.endpoint.url());
        let mut registered = false;
        let result = session(
            &mut settings,
            &events,
            &mut cmds,
            &status,
            (&mut failover, &mut registered),
            &mut gate,
            &cancel,
        )
        .await;
        status.set_rendezvous(false, None, settings.port);
        let ended = if registered {
            Ended::Lost
        } else {
            Ended::Failed
        };
        let url = settings.endpoint.url().to_owned();
        let delay = match &result {
            Err(RvError::Refused { code, message }) if code.is_fatal_for_registration() => {
                error!(%url, code = code.as_str(), %message, "rendezvous refused registration; fix the config (name, key or token). Retrying in 30s");
                Duration::from_secs(30)
            }
            Err(e) => {
                let (next, d) = failover.next(ended, failover::random_unit());
                let next_url = settings.endpoints.get(next).map_or("", Endpoint::url);
                if matches!(e, RvError::Link(LinkError::Untrusted { .. })) {
                    error!(%url, %next_url, retry_in_ms = d.as_millis() as u64, "{e}");
                } else {
                    warn!(%url, error = %e, %next_url, retry_in_ms = d.as_millis() as u64, "rendezvous connection lost; reconnecting");
                }
                d
            }
            Ok(()) => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

type Ws = WebSocketStream<RvStream>;

async fn recv(ws: &mut Ws) -> Result<ServerMsg, RvError> {
    loop {
        match ws.next().await {
            None => return Err(RvError::Protocol("server closed the connection".into())),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| RvError::Protocol(format!("unreadable message: {e}")));
            }
            Some(Ok(Message::Close(_))) => {
                return Err(RvError::Protocol("server closed the connection".into()))
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn send(ws: &mut Ws, msg: &ClientMsg) -> Result<(), RvError> {
    let text = serde_json::to_string(msg).map_err(|e| RvError::Protocol(e.to_string()))?;
    ws.send(Message::text(text)).await?;
    Ok(())
}

async fn connect_and_register(settings: &mut RvSettings) -> Result<Registered, RvError> {
    let endpoint = &settings.endpoint;
    // Every A and AAAA record: the first (the resolver's preference) is
    // where we register, the first of the other family where we show the
    // server our endpoint in that family too (`observe_other`).
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(endpoint.host_port())
        .await?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| RvError::Unresolved(endpoint.url().to_owned()))?;
    let other = addrs
        .iter()
        .copied()
        .find(|a| a.is_ipv4() != addr.is_ipv4());
    let sock = bind_punch_socket(addr, settings.port)?;
    let connecting = Instant::now();
    let tcp = sock.connect(addr).await?;
    // One round trip (SYN to SYN-ACK): the server's RTT for us until our
    // pings report one (`Hello::rtt_us`).
    let connect_rtt = connecting.elapsed();
    set_abortive_close(&tcp);
    // Punch orders and pongs are small and time-critical.
    let _ = tcp.set_nodelay(true);

    let local = tcp.local_addr()?;
    if settings.port == 0 {
        settings.port = local.port();
        info!(port = settings.port, "punch port chosen");
    }
    let link = endpoint.wrap(tcp).await?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        endpoint.ws_url("/v1/ws"),
        link,
        Some(ws_limits(MAX_SERVER_MESSAGE)),
    )
    .await?;
    let nonce = match recv(&mut ws).await? {
        ServerMsg::Challenge { nonce, .. } => {
            decode_nonce(&nonce).map_err(|e| RvError::Protocol(e.to_string()))?
        }
        other => {
            return Err(RvError::Protocol(format!(
                "expected challenge, got {other:?}"
            )))
        }
    };
    let udp_port = settings.quic.as_ref().map(|q| q.port());
    settings.portmap.start(local, settings.port, udp_port);
    // NAT discovery only once the server has spoken our protocol (a dead
    // or foreign endpoint costs no extra connections), alongside the
    // port-mapping probe, both before the hello that carries them.
    let (mapped, nat) = tokio::join!(
        settings.portmap.settled(PORTMAP_WAIT),
        settings.nat.refresh(&settings.endpoint)
    );
    let mapped = portmap::endpoints(mapped);
    if let Some(q) = &settings.quic {
        q.set_mapped(mapped.1.is_some());
    }
    let mut local_addrs = if settings.local_candidates {
        vec![local]
    } else {
        vec![]
    };
    // This host's own IPv6 addresses on the punch port: without NAT, they
    // are public endpoints (see `punch::family` for which, in what order).
    // A unique-local one only counts as a LAN address would. None for a
    // rendezvous on loopback: it and every peer registered there are on
    // this host, reached over loopback (tests, demos), and this host's
    // other addresses would only add candidates that lead back here.
    let own_v6 = if addr.ip().is_loopback() {
        Vec::new()
    } else {
        family::offerable_v6(&std::fs::read_to_string(IF_INET6).unwrap_or_default())
    };
    for ip in &own_v6 {
        let a = SocketAddr::new(IpAddr::V6(*ip), settings.port);
        let unique_local = (ip.segments()[0] & 0xfe00) == 0xfc00;
        if (settings.local_candidates || !unique_local) && !local_addrs.contains(&a) {
            local_addrs.push(a);
        }
    }
    let reach = family::Reach {
        v4: addr.is_ipv4()
            || family::has_ipv4_route(std::fs::read_to_string(IPV4_ROUTES).ok().as_deref()),
        v6: !own_v6.is_empty() || addr.is_ipv6(),
        quic_v6: settings.quic.as_ref().is_some_and(|q| q.dual_stack()),
    };
    let hello = Hello {
        version: PROTOCOL_VERSION,
        name: settings.name.clone(),
        public_key: b64(&settings.identity.public_key().0),
        local_addrs,
        udp_port,
        mapped_tcp: mapped.0,
        mapped_udp: mapped.1,
        nat,
        rtt_us: Some(connect_rtt.as_micros().try_into().unwrap_or(u64::MAX)),
        token: settings.token.as_ref().map(|t| t.expose().to_owned()),
        signature: sign_challenge(
            settings.identity.signing_key(),
            &nonce,
            &settings.name,
            settings.token.as_ref().map(Secret::expose),
        ),
        observe_only: false,
    };
    send(&mut ws, &ClientMsg::Hello(hello)).await?;
    match recv(&mut ws).await? {
        ServerMsg::Welcome {
            observed_addr,
            udp_port,
            server_key,
            observe_only,
            ..
        } => {
            note_server_key(settings.server_key.as_ref(), server_key.as_deref());
            // Probe the server's IPv4 address (the family behind a NAT,
            // whose mapping only a probe can show), else its IPv6 one when
            // the QUIC socket is dual-stack (an IPv6-only host).
            let server = [Some(addr), other].into_iter().flatten();
            let probe_at = server
                .clone()
                .find(SocketAddr::is_ipv4)
                .or_else(|| server.clone().find(|a| reach.quic_v6 && a.is_ipv6()));
            Ok(Registered {
                ws,
                observed: observed_addr,
                udp_server: udp_port
                    .zip(probe_at)
                    .map(|(p, a)| SocketAddr::new(a.ip(), p)),
                nonce,
                mapped,
                // Only a server that says it takes observe-only hellos
                // gets one (an older one would take it for a registration
                // replacing ours).
                other: other.filter(|_| observe_only),
                reach,
            })
        }
        ServerMsg::Error { code, message } => Err(RvError::Refused { code, message }),
        other => Err(RvError::Protocol(format!(
            "expected welcome, got {other:?}"
        ))),
    }
}

/// Shows the rendezvous our endpoint in the other address family: a
/// second connection to `server` (the first address of that family its
/// name resolved to) from a punch socket of that family on the punch port,
/// an observe-only hello, and the welcome saying what the server saw. The
/// connection then ends; the server keeps the endpoint on our
/// registration and offers it to peers.
async fn observe_other(settings: RvSettings, server: SocketAddr) -> Result<SocketAddr, RvError> {
    let sock = bind_punch_socket(server, settings.port)?;
    let tcp = sock.connect(server).await?;
    set_abortive_close(&tcp);
    let _ = tcp.set_nodelay(true);
    let link = settings.endpoint.wrap(tcp).await?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        settings.endpoint.ws_url("/v1/ws"),
        link,
        Some(ws_limits(MAX_SERVER_MESSAGE)),
    )
    .await?;
    let ServerMsg::Challenge { nonce, .. } = recv(&mut ws).await? else {
        return Err(RvError::Protocol("expected challenge".into()));
    };
    let nonce = decode_nonce(&nonce).map_err(|e| RvError::Protocol(e.to_string()))?;
    let token = settings.token.as_ref().map(Secret::expose);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        name: settings.name.clone(),
        public_key: b64(&settings.identity.public_key().0),
        local_addrs: vec![],
        udp_port: None,
        mapped_tcp: None,
        mapped_udp: None,
        token: token.map(str::to_owned),
        signature: sign_challenge(
            settings.identity.signing_key(),
            &nonce,
            &settings.name,
            token,
        ),
        nat: None,
        rtt_us: None,
        observe_only: true,
    };
    send(&mut ws, &ClientMsg::Hello(hello)).await?;
    let answer = recv(&mut ws).await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    match answer {
        ServerMsg::Welcome { observed_addr, .. } => Ok(observed_addr),
        ServerMsg::Error { code, message } => Err(RvError::Refused { code, message }),
        other => Err(RvError::Protocol(format!(
            "expected welcome, got {other:?}"
        ))),
    }
}

/// One connection's lifetime.
async fn session(
    settings: &mut RvSettings,
    events: &mpsc::Sender<RvEvent>,
    cmds: &mut mpsc::Receiver<RvCmd>,
    status: &StatusBoard,
    (failover, registered): (&mut Failover, &mut bool),
    gate: &mut OrderGate,
    cancel: &CancellationToken,
) -> Result<(), RvError> {
    let Registered {
        mut ws,
        observed,
        udp_server,
        nonce,
        mapped,
        other,
        reach,
    } = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, connect_and_register(settings)) => r.map_err(|_| RvError::Protocol("no welcome within 10s".into()))??,
        _ = cancel.cancelled() => return Ok(()),
    };
    info!(url = settings.endpoint.url(), public = %observed, port = settings.port, "registered with rendezvous");
    failover.registered();
    *registered = true;
    status.set_rendezvous(true, Some(observed), settings.port);
    status.set_public_addr6(observed.is_ipv6().then_some(observed));
    // The other family, beside (never blocking) registration: a broken
    // IPv6 path costs nothing but this timeout, in the background.
    let mut observing = other.map(|server| {
        Box::pin(tokio::time::timeout(
            OBSERVE_TIMEOUT,
            observe_other(settings.clone(), server),
        ))
    });
    let mut prober = match (&settings.quic, udp_server) {
        (Some(q), Some(server)) => Some(Prober::new(
            q.clone(),
            server,
            nonce,
            &settings.name,
            &settings.identity,
        )),
        (Some(_), None) => {
            warn!("the rendezvous has no UDP observation endpoint; peers cannot reach us over QUIC (upgrade the server or set its udp_listen)");
            None
        }
        _ => None,
    };
    let rebound_on = prober.as_ref().map(|p| p.path().clone());
    // Peers learn our UDP endpoint from the first probe the server sees,
    // and our endpoint in the other address family from the observe-only
    // hello, so initiators wait for both (briefly: UDP_WAIT at most) before
    // asking for punches. (Without the second wait, a punch asked for at
    // once went out with one family: lab v6-name.)
    let mut waiting = (prober.is_some(), observing.is_some());
    let mut up_at = (waiting.0 || waiting.1).then(|| Instant::now() + UDP_WAIT);
    if up_at.is_none() {
        let _ = events.send(RvEvent::Up).await;
    }
    let mut pings = Pings::new(Instant::now());
    let mut mapper = settings.portmap.clone();
    loop {
        let probe_due = prober.as_ref().map(Prober::next_due);
        tokio::select! {
            _ = tokio::time::sleep_until(probe_due.unwrap_or_else(Instant::now).into()), if probe_due.is_some() => {
                if let Some(p) = prober.as_mut() { p.send().await; }
            }
            Some(()) = async { match &rebound_on { Some(q) => { q.rebound().await; Some(()) } None => None } } => {
                if let Some(p) = prober.as_mut() { p.restart(); }
            }
            Some(udp) = async { match prober.as_mut() { Some(p) => p.ack().await, None => None } } => {
                if status.set_public_udp(udp) {
                    info!(public_udp = %udp, "UDP endpoint observed by the rendezvous");
                }
                waiting.0 = false;
                if !waiting.1 && up_at.take().is_some() {
                    let _ = events.send(RvEvent::Up).await;
                }
            }
            _ = tokio::time::sleep_until(up_at.unwrap_or_else(Instant::now).into()), if up_at.is_some() => {
                if waiting.0 {
                    warn!("no answer to UDP probes yet (UDP blocked on the way to the rendezvous?); punching over TCP until one arrives");
                }
                up_at = None;
                let _ = events.send(RvEvent::Up).await;
            }
            Some(seen) = async { match observing.as_mut() { Some(f) => Some(f.await), None => None } } => {
                observing = None;
                match seen {
                    Ok(Ok(alt)) => {
                        info!(%alt, "endpoint in the other address family observed by the rendezvous");
                        if alt.is_ipv6() {
                            status.set_public_addr6(Some(alt));
                        }
                    }
                    Ok(Err(e)) => info!(error = %e, "the rendezvous is not reachable over the other address family; offering this one only"),
                    Err(_) => info!(timeout_ms = OBSERVE_TIMEOUT.as_millis() as u64, "the rendezvous is not reachable over the other address family in time; offering this one only"),
                }
                waiting.1 = false;
                if !waiting.0 && up_at.take().is_some() {
                    let _ = events.send(RvEvent::Up).await;
                }
            }
            _ = mapper.differs_from(mapped) => {
                // Peers learn candidates from the registration: register again with the new ones.
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return Err(RvError::Protocol("the router's port mapping changed; registering again to announce it".into()));
            }
            _ = cancel.cancelled() => {
                // Say goodbye so the server unregisters us at once.
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return Ok(());
            }
            _ = tokio::time::sleep_until(pings.next_ping.into()) => {
                let ping = pings.ping(Instant::now(), unix_time_us())?;
                send(&mut ws, &ping).await?;
            }
            cmd = cmds.recv() => match cmd {
                Some(RvCmd::Connect(peer)) => send(&mut ws, &ClientMsg::Connect { peer }).await?,
                Some(RvCmd::Report(r)) => send(&mut ws, &ClientMsg::Result(r)).await?,
                Some(RvCmd::Probe) => {
                    pings.watchful(Instant::now());
                    // The router may have restarted and forgotten our mapping too.
                    settings.portmap.tunnel_lost();
                }
                None => return Ok(()),
            },
            msg = recv(&mut ws) => {
                let me = Me { name: &settings.name, nonce: &nonce, pinned: settings.server_key.as_ref(), status, settings, reach, observed: Some(observed.ip()) };
                on_message(msg?, &mut pings, gate, settings.port, me, events).await?
            }
        }
    }
}

/// Says which server key signs our orders, and whether it is the pinned one.
fn note_server_key(pinned: Option<&VerifyingKey>, announced: Option<&str>) {
    match (pinned, announced) {
        (None, Some(k)) => info!(server_key = k, "punch orders are not checked; pin this key as [rendezvous] server_key once you have checked it with `punch-rendezvous pubkey` on the server"),
        (Some(p), Some(k)) if b64(p.as_bytes()) != k => warn!(announced = k, pinned = %b64(p.as_bytes()), "the rendezvous announces another server key than [rendezvous] server_key; its punch orders will be refused"),
        _ => {}
    }
}

/// The largest message the server may send us. Its biggest, a punch
/// order with every candidate and a signature, is under 4 KiB; tungstenite's
/// default (64 MiB) would let a hostile server make us buffer that much.
pub(crate) const MAX_SERVER_MESSAGE: usize = 64 * 1024;

/// A WebSocket client configuration that refuses messages and frames over `max`.
pub(crate) fn ws_limits(max: usize) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// This registration, as far as checking orders goes.
#[derive(Clone, Copy)]
struct Me<'a> {
    name: &'a str,
    nonce: &'a [u8; 32],
    pinned: Option<&'a VerifyingKey>,
    status: &'a StatusBoard,
    /// The instance in use, the relay for its orders.
    settings: &'a RvSettings,
    /// The families whose candidates are worth punching from here.
    reach: family::Reach,
    /// Our public IP as this registration's server sees it: a peer at the
    /// same one is behind our NAT, the only peer whose LAN addresses an
    /// order may make us contact.
    observed: Option<std::net::IpAddr>,
}

/// Whether to act on `order`: always without a pinned key (the link, TLS
/// or not, is all that vouches for it), else only if the pinned key
/// signed it for us on this registration.
pub(crate) fn check_order(
    pinned: Option<&VerifyingKey>,
    me: &str,
    nonce: &[u8],
    order: &PunchOrder,
) -> Result<(), OrderError> {
    match pinned {
        None => Ok(()),
        Some(key) => verify_order(key, me, nonce, order),
    }
}

/// Acts on one message from the server; an error ends the session.
async fn on_message(
    msg: ServerMsg,
    pings: &mut Pings,
    gate: &mut OrderGate,
    port: u16,
    me: Me<'_>,
    events: &mpsc::Sender<RvEvent>,
) -> Result<(), RvError> {
    match msg {
        ServerMsg::Pong { id, server_time_us } => {
            pings.pong(id, server_time_us, unix_time_us(), Instant::now());
        }
        ServerMsg::Punch(mut order) => {
            if let Err(e) = check_order(me.pinned, me.name, me.nonce, &order) {
                me.status.order_refused();
                warn!(session = %order.session, peer = %order.peer, "refusing a punch order: {e}; nothing is sent to its candidates (a proxy or the network between us and the server may be tampering)");
                return Ok(());
            }
            if !gate.admit(&order.peer, Instant::now()) {
                me.status.limits.hit(Limit::OrderRate);
                warn!(session = %order.session, peer = %order.peer, burst = order::ORDER_BURST, "refusing a punch order: more orders for this peer than the budget allows; nothing is sent (the server repeats orders: check its version and logs)");
                return Ok(());
            }
            // Only the peer's own addresses (issue #24), then only what
            // our sockets can reach: IPv6 candidates when we have IPv6,
            // UDP ones only if the QUIC socket is dual-stack too.
            let public = order::peer_public_ips(&order.candidates, &order.udp_candidates);
            let mut hits = order::keep_peer_addresses(&mut order.candidates, &public, me.observed);
            hits.extend(order::keep_peer_addresses(
                &mut order.udp_candidates,
                &public,
                me.observed,
            ));
            me.reach
                .keep_reachable(&mut order.candidates, &mut order.udp_candidates);
            hits.extend(order::trim_candidates(&mut order.candidates));
            hits.extend(order::trim_candidates(&mut order.udp_candidates));
            hits.extend(order::check_strategy(&mut order));
            hits.extend(gate.admit_strategy(&mut order, Instant::now()));
            if !hits.is_empty() {
                for h in &hits {
                    me.status.limits.hit(*h);
                }
                warn!(session = %order.session, peer = %order.peer, dropped = hits.len(), kept_tcp = order.candidates.len(), kept_udp = order.udp_candidates.len(), "punch order trimmed: candidates beyond the limits (count, ports, unusable addresses, not the peer's own) are not contacted");
            }
            let now_us = unix_time_us();
            let (fire_at, clamped) = pings
                .clock
                .local_instant(order.at_us, Instant::now(), now_us);
            if let Some(late) = pings.clock.late_by(order.at_us, now_us) {
                me.status.order_late();
                warn!(session = %order.session, peer = %order.peer, late_ms = late.as_millis() as u64, synced = pings.clock.is_synced(), "punch order arrived after its firing time; punching now, so the two SYNs do not leave together and a NAT that rejects unsolicited SYNs may refuse this attempt (the server underestimated our distance, or our clock disagrees with its: check NTP)");
            }
            if clamped {
                me.status.limits.hit(Limit::OrderTooFarAhead);
                warn!(session = %order.session, peer = %order.peer, "punch order's time is more than {:?} ahead; punching at that bound instead (the server's clock or ours is off)", clock::MAX_AHEAD);
            }
            debug!(session = %order.session, peer = %order.peer, synced = pings.clock.is_synced(), "punch order");
            let relay = me.settings.endpoint.clone();
            let job = PunchJob {
                order,
                fire_at,
                port,
                received: Instant::now(),
                relay,
            };
            let _ = events.send(RvEvent::Punch(Box::new(job))).await;
        }
        ServerMsg::PunchAborted { session, peer } => {
            let _ = events.send(RvEvent::Aborted { session, peer }).await;
        }
        ServerMsg::Error { code, message } => {
            if matches!(
                code,
                ErrorCode::ShuttingDown
                    | ErrorCode::Replaced
                    | ErrorCode::RateLimited
                    | ErrorCode::Timeout
                    | ErrorCode::Malformed
            ) {
                return Err(RvError::Refused { code, message });
            }
            let _ = events.send(RvEvent::Refused { code, message }).await;
        }
        other => debug!(?other, "ignoring unexpected message"),
    }
    Ok(())
}

/// The ping schedule and the clock estimate the pongs feed: no IO, the
/// caller sends what [`Pings::ping`] returns and passes every instant in.
#[derive(Debug)]
struct Pings {
    clock: ClockSync,
    /// Pings awaiting their pong: (id, sent at, Unix µs).
    sent: VecDeque<(u64, u64)>,
    next_id: u64,
    last_pong: Instant,
    next_ping: Instant,
    /// Pings stay frequent until this (see [`RvCmd::Probe`]).
    watchful_until: Instant,
}

impl Pings {
    fn new(now: Instant) -> Self {
        Self {
            clock: ClockSync::default(),
            sent: VecDeque::new(),
            next_id: 0,
            last_pong: now,
            next_ping: now,
            watchful_until: now,
        }
    }

    /// The ping due now, and when the next one is; an error if the server
    /// has been silent for [`PONG_TIMEOUT`].
    fn ping(&mut self, now: Instant, unix_us: u64) -> Result<ClientMsg, RvError> {
        if now.saturating_duration_since(self.last_pong) > PONG_TIMEOUT {
            return Err(RvError::Protocol(format!("no pong for {PONG_TIMEOUT:?}")));
        }
        self.next_id += 1;
        if self.sent.len() >= 8 {
            self.sent.pop_front();
        }
        self.sent.push_back((self.next_id, unix_us));
        let quick = self.next_id <= u64::from(QUICK_PINGS);
        self.next_ping = now
            + if quick {
                Duration::from_millis(100)
            } else if now < self.watchful_until {
                WATCHFUL_PING
            } else {
                PING_INTERVAL
            };
        Ok(ClientMsg::Ping {
            id: self.next_id,
            rtt_us: self.clock.rtt_us(),
        })
    }

    /// A pong: feeds the clock estimate if it answers a ping we sent.
    fn pong(&mut self, id: u64, server_time_us: u64, unix_us: u64, now: Instant) {
        if let Some(pos) = self.sent.iter().position(|(i, _)| *i == id) {
            let (_, t0) = self.sent.remove(pos).unwrap_or((id, 0));
            self.clock.add(t0, server_time_us, unix_us);
            self.last_pong = now;
        }
    }

    /// Ping now, and every [`WATCHFUL_PING`] for [`WATCHFUL_FOR`].
    fn watchful(&mut self, now: Instant) {
        self.next_ping = now;
        self.watchful_until = now + WATCHFUL_FOR;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(msg: &ClientMsg) -> u64 {
        match msg {
            ClientMsg::Ping { id, .. } => *id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quick_pings_then_the_steady_interval_and_watchful_after_a_probe() {
        let t0 = Instant::now();
        let mut p = Pings::new(t0);
        for n in 1..=u64::from(QUICK_PINGS) {
            let now = p.next_ping;
            assert_eq!(id(&p.ping(now, 0).unwrap()), n);
            assert_eq!(p.next_ping, now + Duration::from_millis(100));
            p.pong(n, 1, 2, now);
        }
        let now = p.next_ping;
        p.ping(now, 0).unwrap();
        assert_eq!(p.next_ping, now + PING_INTERVAL);
        // A lost tunnel: ping now, then every second for a while.
        p.watchful(now);
        assert_eq!(p.next_ping, now);
        p.ping(now, 0).unwrap();
        assert_eq!(p.next_ping, now + WATCHFUL_PING);
        let later = now + WATCHFUL_FOR;
        p.pong(p.next_id, 1, 2, later);
        p.ping(later, 0).unwrap();
        assert_eq!(p.next_ping, later + PING_INTERVAL);
    }

    #[test]
    fn orders_are_checked_only_against_a_pinned_key() {
        let order = PunchOrder {
            initiator: false,
            ..order::blank_order()
        };
        let server = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let pinned = server.verifying_key();
        assert!(check_order(None, "alice", &[0; 32], &order).is_ok());
        assert_eq!(
            check_order(Some(&pinned), "alice", &[0; 32], &order),
            Err(OrderError::Unsigned)
        );
        let mut signed = order.clone();
        punch_rendezvous::protocol::sign_order(&server, "alice", &[0; 32], &mut signed);
        assert!(check_order(Some(&pinned), "alice", &[0; 32], &signed).is_ok());
        assert!(check_order(Some(&pinned), "alice", &[1; 32], &signed).is_err());
    }

    #[test]
    fn a_silent_server_ends_the_session_and_unknown_pongs_do_not_count() {
        let t0 = Instant::now();
        let mut p = Pings::new(t0);
        p.ping(t0, 0).unwrap();
        p.pong(99, 1, 2, t0 + PONG_TIMEOUT); // not ours
        assert!(p.ping(t0 + PONG_TIMEOUT, 0).is_ok());
        let err = p.ping(t0 + PONG_TIMEOUT + Duration::from_millis(1), 0);
        assert!(matches!(err, Err(RvError::Protocol(_))), "{err:?}");
    }
}
