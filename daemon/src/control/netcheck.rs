//! NAT discovery's probing: ask the rendezvous's two endpoints what source
//! address they see, over TCP and UDP, from two local ports each, and
//! classify (`crate::nat::classify`). `punchd netcheck` runs it once; the
//! daemon runs it before registering when it has no result yet, when the
//! default gateway changed since the last one (a network change), or when
//! the last one is [`RECHECK_AFTER`] old (after a failed check, not again
//! for a minute), once the server has answered the WebSocket with its
//! challenge and before the hello that carries the result.
//!
//! The questions use fresh local ports, not the punch port: the rendezvous
//! connection already holds the punch port's 4-tuple to `listen`, and a
//! NAT's mapping behaviour is the NAT's, not a port's. Port preservation
//! is measured on these ports the same way.
//!
//! Cost, bounded: 4 TCP connections and at most 12 datagrams (4 questions,
//! 3 tries each), plus the gateway's port-mapping probe for `netcheck`.
//! `punchd netcheck`'s first flow also asks the server for one
//! unsolicited SYN toward its own mapping (`inbound`, rendezvous
//! `server/observe.rs`): whether the NAT drops it or answers with RST. The
//! daemon's own check at registration does not ask: behind a NAT that
//! drops, the answer takes the server's 500 ms wait, which every
//! registration would pay.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use punch_rendezvous::datagram::{self, Datagram};
use punch_rendezvous::nat::Unsolicited;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UdpSocket;

use super::link::Endpoint;
use crate::nat::classify::{classify, Flow};
use crate::nat::NatDoc;
use crate::punch::bind_punch_socket;

/// One TCP connection (connect, and the answer) may take this long.
const TCP_TIMEOUT: Duration = Duration::from_millis(1500);
/// The unsolicited-SYN test's verdict may take this long after the
/// question (the server waits 500 ms for an answer to its SYN).
const INBOUND_TIMEOUT: Duration = Duration::from_millis(1500);
/// One UDP question is sent this many times, this far apart.
const UDP_TRIES: u32 = 3;
const UDP_WAIT: Duration = Duration::from_millis(250);
/// The daemon checks again at the next registration after this long.
pub(crate) const RECHECK_AFTER: Duration = Duration::from_secs(30 * 60);
/// Local ports (flows) asked from, per transport.
const FLOWS: usize = 2;

/// Why no check could be made at all.
#[derive(Debug, thiserror::Error)]
pub enum NetcheckError {
    /// The config names no rendezvous.
    #[error("no [rendezvous] url in the config")]
    NoUrl,
    /// The rendezvous URL or its TLS settings are unusable.
    #[error(transparent)]
    Link(#[from] super::link::LinkError),
    /// The rendezvous host does not resolve to an IPv4 address.
    #[error("{0}: no IPv4 address for the rendezvous host")]
    Unresolved(String),
    /// `GET /v1/observe` on the rendezvous failed: nothing to compare with.
    #[error("the rendezvous {url} did not answer GET /v1/observe over TCP: {why}")]
    Unreachable {
        /// The rendezvous URL.
        url: String,
        /// What failed.
        why: String,
    },
}

/// What `GET /v1/observe` answers.
#[derive(Debug, Deserialize)]
struct Observation {
    observed: SocketAddr,
    #[serde(default)]
    udp_port: Option<u16>,
    #[serde(default)]
    observe_port: Option<u16>,
}

/// Runs one check against `endpoint`'s rendezvous. `port_mapping` is
/// filled by the caller (the probe of the gateway is the port mapper's).
/// With `unsolicited`, the check also asks for the unsolicited-SYN test,
/// which behind a NAT that drops takes the server's 500 ms wait.
pub(crate) async fn check(endpoint: &Endpoint, unsolicited: bool) -> Result<NatDoc, NetcheckError> {
    let started = Instant::now();
    let server = tokio::net::lookup_host(endpoint.host_port())
        .await
        .ok()
        .and_then(|mut a| a.find(SocketAddr::is_ipv4))
        .ok_or_else(|| NetcheckError::Unresolved(endpoint.url().to_owned()))?;
    let mut tcp_flows = Vec::new();
    let mut info: Option<Observation> = None;
    let mut first_error = None;
    let mut asked = None;
    let mut asked_at = None;
    for i in 0..FLOWS {
        // The unsolicited-SYN test rides on the first flow's second
        // question: one SYN toward that flow's mapping, whose verdict is
        // read after the other questions (the server waits up to 500 ms
        // for an answer to its SYN; meanwhile the check goes on).
        match tcp_flow(endpoint, server, &mut info, unsolicited && i == 0).await {
            Ok((f, a)) => {
                tcp_flows.push(f);
                asked = asked.or(a);
                asked_at.get_or_insert_with(tokio::time::Instant::now);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let Some(info) = info else {
        return Err(NetcheckError::Unreachable {
            url: endpoint.url().to_owned(),
            why: first_error.unwrap_or_else(|| "no answer".into()),
        });
    };
    let udp_main = info.udp_port.map(|p| SocketAddr::new(server.ip(), p));
    let second = info.observe_port.map(|p| SocketAddr::new(server.ip(), p));
    let mut udp_flows = Vec::new();
    if udp_main.is_some() || second.is_some() {
        for _ in 0..FLOWS {
            if let Ok(f) = udp_flow(udp_main, second).await {
                udp_flows.push(f);
            }
        }
    }
    let unsolicited = match (asked, asked_at) {
        (Some(conn), Some(at)) => tokio::time::timeout_at(at + INBOUND_TIMEOUT, verdict(conn))
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    let tcp = classify(&tcp_flows);
    let udp = classify(&udp_flows);
    let seen = |flows: &[Flow]| -> Vec<String> {
        flows
            .iter()
            .map(|f| {
                let s = |a: Option<SocketAddr>| a.map_or("-".to_owned(), |a| a.to_string());
                format!("{} -> {} / {}", f.local_port, s(f.main), s(f.second))
            })
            .collect()
    };
    Ok(NatDoc {
        mapping_tcp: tcp.mapping.as_str().to_owned(),
        mapping_udp: udp.mapping.as_str().to_owned(),
        port_mapping: Vec::new(),
        port_preserved_tcp: tcp.port_preserved,
        port_preserved_udp: udp.port_preserved,
        delta_tcp: tcp.delta,
        delta_udp: udp.delta,
        unsolicited_tcp: unsolicited.map(|u| u.as_str().to_owned()),
        public_ip: Some(info.observed.ip().to_string()),
        observed_tcp: seen(&tcp_flows),
        observed_udp: seen(&udp_flows),
        elapsed_ms: started.elapsed().as_millis() as u64,
        checked_unix_ms: punch_rendezvous::protocol::unix_time_us() / 1000,
    })
}

/// One local TCP port: `GET /v1/observe` on `listen`, then one line from
/// `observe_port`. The first answer's ports are kept in `info`.
async fn tcp_flow(
    endpoint: &Endpoint,
    server: SocketAddr,
    info: &mut Option<Observation>,
    inbound: bool,
) -> Result<(Flow, Option<tokio::net::TcpStream>), String> {
    let sock = bind_punch_socket(server, 0).map_err(|e| e.to_string())?;
    let local_port = sock.local_addr().map_err(|e| e.to_string())?.port();
    let main = tokio::time::timeout(TCP_TIMEOUT, http_observe(endpoint, sock, server))
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r);
    let main = match main {
        Ok(o) => {
            let seen = o.observed;
            if info.is_none() {
                *info = Some(o);
            }
            Some(seen)
        }
        Err(e) if info.is_none() => return Err(e),
        Err(_) => None,
    };
    let second = match info.as_ref().and_then(|i| i.observe_port) {
        Some(p) => {
            let to = SocketAddr::new(server.ip(), p);
            tokio::time::timeout(TCP_TIMEOUT, line_observe(local_port, to, inbound))
                .await
                .ok()
                .and_then(Result::ok)
        }
        None => None,
    };
    let (second, asked) = match second {
        Some((a, asked)) => (Some(a), asked),
        None => (None, None),
    };
    Ok((
        Flow {
            local_port,
            main,
            second,
        },
        asked,
    ))
}

async fn http_observe(
    endpoint: &Endpoint,
    sock: tokio::net::TcpSocket,
    server: SocketAddr,
) -> Result<Observation, String> {
    let tcp = sock.connect(server).await.map_err(|e| e.to_string())?;
    let stream = endpoint.wrap(tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let request = hyper::Request::builder()
        .uri("/v1/observe")
        .header(hyper::header::HOST, endpoint.host_port())
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        // A small JSON object; anything larger is not our server.
        let body = http_body_util::Limited::new(resp.into_body(), 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice::<Observation>(&body).map_err(|e| e.to_string())
    };
    tokio::select! {
        r = fetch => r,
        r = conn => Err(format!("connection ended early: {r:?}")),
    }
}

/// Connects from `local_port` to `to` and reads the one line it writes;
/// with `inbound`, then asks for the unsolicited-SYN test on this
/// connection's mapping and hands the connection back, to read the
/// verdict from ([`verdict`]) while the rest of the check runs.
async fn line_observe(
    local_port: u16,
    to: SocketAddr,
    inbound: bool,
) -> Result<(SocketAddr, Option<tokio::net::TcpStream>), String> {
    let sock = bind_punch_socket(to, local_port).map_err(|e| e.to_string())?;
    let mut tcp = sock.connect(to).await.map_err(|e| e.to_string())?;
    let seen = read_line(&mut tcp)
        .await
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| "not an address".to_owned())?;
    if inbound && tcp.write_all(b"inbound\n").await.is_ok() {
        return Ok((seen, Some(tcp)));
    }
    Ok((seen, None))
}

/// The unsolicited-SYN test's verdict on a connection that asked for it
/// (`None` from a server that does not offer it: it closes after the
/// line).
async fn verdict(mut tcp: tokio::net::TcpStream) -> Option<Unsolicited> {
    let line = read_line(&mut tcp).await?;
    Unsolicited::parse(line.trim().strip_prefix("inbound ")?)
}

/// One line (at most 64 bytes) from `tcp`, without its newline.
async fn read_line(tcp: &mut tokio::net::TcpStream) -> Option<String> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match tcp.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ if !line.is_empty() => break,
            _ => return None,
        }
    }
    String::from_utf8(line).ok()
}

/// One local UDP port: an `observe` question to each endpoint in turn.
async fn udp_flow(main: Option<SocketAddr>, second: Option<SocketAddr>) -> std::io::Result<Flow> {
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    let local_port = sock.local_addr()?.port();
    let ask = async |to: Option<SocketAddr>| match to {
        Some(to) => udp_observe(&sock, to).await,
        None => None,
    };
    let main = ask(main).await;
    let second = ask(second).await;
    Ok(Flow {
        local_port,
        main,
        second,
    })
}

async fn udp_observe(sock: &UdpSocket, to: SocketAddr) -> Option<SocketAddr> {
    let mut nonce = [0u8; 8];
    let _ = getrandom::fill(&mut nonce);
    let nonce = u64::from_be_bytes(nonce);
    let question = datagram::observe(nonce);
    let mut buf = [0u8; datagram::MAX_LEN + 1];
    for _ in 0..UDP_TRIES {
        sock.send_to(&question, to).await.ok()?;
        let until = tokio::time::Instant::now() + UDP_WAIT;
        loop {
            let r = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await;
            match r {
                Err(_) => break,
                // ICMP unreachable from an earlier send: try again.
                Ok(Err(_)) => break,
                Ok(Ok((n, from))) => {
                    if from.ip() != to.ip() {
                        continue;
                    }
                    if let Some(Datagram::Observed {
                        nonce: n2,
                        observed,
                    }) = datagram::parse(&buf[..n])
                    {
                        if n2 == nonce {
                            return Some(observed);
                        }
                    }
                }
            }
        }
        // Wait out the rest of the interval after an early error.
        tokio::time::sleep_until(until).await;
    }
    None
}

/// The default gateway, as the "network changed" signal (the port mapper
/// watches the same).
pub(crate) fn gateway() -> Option<Ipv4Addr> {
    crate::portmap::gateway::default_gateway()
}

/// Our IPv4 address toward `server`, for the port-mapping probe.
pub(crate) fn local_ipv4_toward(server: SocketAddr) -> Option<Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(server).ok()?;
    match s.local_addr().ok()?.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

/// The daemon's discovery: when to check again, and the board it fills.
#[derive(Debug, Clone)]
pub(crate) struct NatCheck {
    board: std::sync::Arc<crate::nat::Board>,
    /// When the last check finished, and the gateway it ran behind.
    last: Option<(Instant, Option<Ipv4Addr>)>,
    /// After a failed check, not again before this (a server without the
    /// observe endpoints is not asked at every reconnect).
    retry_at: Option<Instant>,
}

/// A failed check is tried again at a registration after this long.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);

/// A registration waits at most this long for a check.
const CHECK_BUDGET: Duration = Duration::from_secs(5);

impl NatCheck {
    pub(crate) fn new(board: std::sync::Arc<crate::nat::Board>) -> Self {
        Self {
            board,
            last: None,
            retry_at: None,
        }
    }

    /// Checks again if there is no result yet, the default gateway changed
    /// (the network did), or the last result is old; returns what the
    /// hello should carry.
    pub(crate) async fn refresh(
        &mut self,
        endpoint: &Endpoint,
    ) -> Option<punch_rendezvous::nat::NatSummary> {
        let gw = gateway();
        let due = match self.last {
            None => true,
            Some((at, was)) => was != gw || at.elapsed() >= RECHECK_AFTER,
        } && self.retry_at.is_none_or(|t| Instant::now() >= t);
        if due {
            // Not the unsolicited-SYN test: behind a NAT that drops it would
            // hold every registration for the server's 500 ms wait (and
            // shift every daemon's start by as much); `punchd netcheck`
            // asks it. Orders then treat our NAT's answer as unknown.
            match tokio::time::timeout(CHECK_BUDGET, check(endpoint, false)).await {
                Ok(Ok(doc)) => {
                    let s = doc.summary();
                    let changed = self.board.set(doc);
                    if changed {
                        tracing::info!(
                            tcp = s.tcp.mapping.as_str(),
                            udp = s.udp.mapping.as_str(),
                            delta_tcp = ?s.tcp.delta,
                            delta_udp = ?s.udp.delta,
                            "NAT discovery"
                        );
                    }
                    self.last = Some((Instant::now(), gw));
                    self.retry_at = None;
                }
                Ok(Err(e)) => {
                    self.retry_at = Some(Instant::now() + RETRY_FAILED_AFTER);
                    tracing::debug!(error = %e, "NAT discovery failed; keeping the last result");
                }
                Err(_) => {
                    self.retry_at = Some(Instant::now() + RETRY_FAILED_AFTER);
                    tracing::debug!("NAT discovery timed out; keeping the last result");
                }
            }
        }
        self.board.doc().map(|d| d.summary())
    }
}

/// `punchd netcheck`: one check against the configured rendezvous (the
/// first of `urls`), plus which port-mapping protocols the gateway
/// answers. Needs no running daemon; exit-code errors are the caller's.
pub async fn netcheck(cfg: &punch_config::PeerConfig) -> Result<NatDoc, NetcheckError> {
    let urls = cfg.rendezvous.urls();
    let url = urls.first().ok_or(NetcheckError::NoUrl)?;
    let endpoint = Endpoint::new(url, cfg.rendezvous.ca_file.as_deref())?;
    let mut doc = check(&endpoint, true).await?;
    let server = tokio::net::lookup_host(endpoint.host_port())
        .await
        .ok()
        .and_then(|mut a| a.find(SocketAddr::is_ipv4));
    if let Some(local) = server.and_then(local_ipv4_toward) {
        if !local.is_loopback() {
            // A port nothing listens on: what PCP may map is removed at once.
            let port = std::net::UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.local_addr())
                .map_or(0, |a| a.port());
            doc.port_mapping = crate::portmap::gateway_answers(local, port).await;
        }
    }
    Ok(doc)
}
