//! Birthday probing over UDP: the random side's sockets and the QUIC
//! handshake over the one that was hit. The method, the probing side and
//! the budgets are in `punch/birthday.rs`.
//!
//! The random side ([`open`]) sends a punch datagram from each of its
//! sockets to the easy side's endpoint and listens on all of them. When
//! the easy side's probe lands on one, it answers from that socket (the
//! easy side hears it through the hole its probe made, and as the QUIC
//! client dials where it heard it), and the tunnel runs on that socket,
//! on a QUIC endpoint of its own ([`QuicPath::endpoint_for`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use punch_config::PublicKeyBytes;
use punch_rendezvous::datagram;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::punch::{QuicEstablished, QuicPunch};
use super::QuicPath;
use crate::path::Role;
use crate::punch::birthday::{Reserved, OPEN_TTL};

/// When the random side sends from every socket, after `at`: the first
/// round opens the mappings, the later ones refresh them (a Linux NAT
/// forgets an unanswered UDP mapping after 30 s) and stand in for a first
/// datagram lost on the way to the NAT.
const OPEN_ROUNDS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(4),
];
/// The most peer IPs the random side sends toward (the order's IPv4 UDP
/// candidates: the observed endpoint and perhaps a router-mapped one).
const MAX_TOWARD: usize = 2;

/// What the random side's share of a birthday punch needs: the punch's
/// own settings (only the peer's IPv4 UDP candidates are used), and the
/// order's.
pub(crate) struct Opening<'a> {
    pub(crate) punch: &'a QuicPunch<'a>,
    pub(crate) sockets: u16,
    /// The first round TTL-limited (`BirthdayOpen::ttl_limited`).
    pub(crate) ttl_limited: bool,
}

/// A socket's next datagram, with the socket handed back.
type Received = (
    usize,
    std::sync::Arc<UdpSocket>,
    [u8; 128],
    std::io::Result<(usize, SocketAddr)>,
);

async fn receive(i: usize, socket: std::sync::Arc<UdpSocket>) -> Received {
    let mut buf = [0u8; 128];
    let r = socket.recv_from(&mut buf).await;
    (i, socket, buf, r)
}

/// The random side: opens the mappings, waits for a probe to land on one,
/// then runs the QUIC handshake over that socket (dialling as the client,
/// accepting as the server). Errors are for the punch's reason.
pub(crate) async fn open(opening: Opening<'_>) -> Result<QuicEstablished, String> {
    let o = opening.punch;
    let toward: Vec<SocketAddr> = o
        .candidates
        .iter()
        .map(|c| super::socket::canonical(*c))
        .filter(|c| c.is_ipv4())
        .take(MAX_TOWARD)
        .collect();
    if toward.is_empty() {
        return Err("birthday: the peer has no IPv4 UDP endpoint to open mappings toward".into());
    }
    let reserved = Reserved::take(usize::from(opening.sockets));
    let mut sockets = Vec::with_capacity(reserved.0);
    for _ in 0..reserved.0 {
        let bound = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        });
        match bound {
            Ok(s) => sockets.push(std::sync::Arc::new(s)),
            Err(e) => {
                warn!(opened = sockets.len(), error = %e, "birthday: cannot open more UDP sockets (raise the open-file limit?); punching with fewer mappings");
                break;
            }
        }
    }
    if sockets.is_empty() {
        return Err(format!(
            "birthday: no socket to open mappings with ({} of {} allowed: other punches hold the daemon's {})",
            reserved.0,
            opening.sockets,
            crate::punch::birthday::MAX_OPEN_SOCKETS
        ));
    }
    let punch = datagram::punch(o.session);
    let mut recvs: FuturesUnordered<_> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| receive(i, s.clone()))
        .collect();
    let mut round = 0;
    let hit = loop {
        let next = OPEN_ROUNDS.get(round).map(|d| o.fire_at + *d);
        tokio::select! {
            _ = tokio::time::sleep_until(next.unwrap_or(o.deadline).into()), if next.is_some() => {
                // The first round TTL-limited (`OPEN_TTL`) unless the
                // peer's NAT drops unsolicited packets: it opens our
                // mappings but expires before the peer's NAT. The later
                // rounds go at the normal TTL: by then the peer has
                // probed many ports, and a datagram to a port it probed
                // passes its NAT (a second way to meet; with all rounds
                // TTL-limited 1 run in 20 found no hit at all).
                for s in &sockets {
                    let normal = s.ttl().ok().filter(|_| round == 0 && opening.ttl_limited);
                    if normal.is_some() {
                        let _ = s.set_ttl(OPEN_TTL);
                    }
                    for to in &toward {
                        let _ = s.send_to(&punch, to).await;
                    }
                    if let Some(ttl) = normal {
                        let _ = s.set_ttl(ttl);
                    }
                }
                if round == 0 {
                    info!(mappings = sockets.len(), toward = ?toward, "birthday: opened our NAT toward the peer from many ports; waiting for its probes");
                }
                round += 1;
            }
            Some((i, s, buf, r)) = recvs.next() => match r {
                Ok((n, from)) if from_peer(&buf[..n], from, o.session, &toward) => break (i, from),
                Ok(_) => recvs.push(receive(i, s)),
                Err(e) => debug!(error = %e, "birthday: a socket failed; it stops listening"),
            },
            _ = tokio::time::sleep_until(o.deadline.into()) => {
                return Err(format!("birthday: no probe of the peer reached any of our {} mappings", sockets.len()));
            }
        }
    };
    let (index, from) = hit;
    drop(recvs);
    let socket = sockets.swap_remove(index);
    drop(sockets);
    info!(%from, local_port = socket.local_addr().map(|a| a.port()).unwrap_or(0), "birthday: the peer's probe landed on one of our mappings");
    // Answer at once: the peer hears us through the hole its probe made,
    // and (as the client) dials where it heard us.
    let _ = socket.send_to(&punch, from).await;
    let socket = std::sync::Arc::try_unwrap(socket)
        .map_err(|_| "birthday: the socket is still shared".to_owned())?
        .into_std()
        .map_err(|e| format!("birthday: {e}"))?;
    let endpoint = o
        .path
        .endpoint_for(socket, o.peer)
        .map_err(|e| format!("birthday: {e}"))?;
    let left = o.deadline.saturating_duration_since(Instant::now());
    let conn = tokio::time::timeout(left, handshake(o.path, &endpoint, o.role, from, o.peer))
        .await
        .map_err(|_| {
            format!("birthday: no QUIC handshake with {from} before the punch's deadline")
        })??;
    Ok(QuicEstablished { conn, rounds: 1 })
}

/// Whether a datagram is this session's punch from one of the peer's IPs.
fn from_peer(buf: &[u8], from: SocketAddr, session: &str, toward: &[SocketAddr]) -> bool {
    toward.iter().any(|t| t.ip() == from.ip())
        && matches!(datagram::parse(buf), Some(datagram::Datagram::Punch { session: s }) if s == session)
}

/// The QUIC handshake on the birthday socket's own endpoint.
async fn handshake(
    path: &QuicPath,
    endpoint: &quinn::Endpoint,
    role: Role,
    from: SocketAddr,
    peer: &PublicKeyBytes,
) -> Result<quinn::Connection, String> {
    match role {
        Role::Client => path
            .connect_from(endpoint, from, peer)
            .map_err(|e| format!("birthday: {e}"))?
            .await
            .map_err(|e| format!("birthday: QUIC handshake with {from}: {e}")),
        Role::Server => loop {
            // The endpoint accepts only the peer's key; anything else
            // fails its handshake, and we wait for the next.
            let Some(incoming) = endpoint.accept().await else {
                return Err("birthday: the endpoint closed".into());
            };
            match incoming.await {
                Ok(conn) if super::peer_key(&conn, &[*peer]).is_some() => return Ok(conn),
                Ok(conn) => conn.close(quinn::VarInt::from_u32(1), b"not the peer"),
                Err(e) => debug!(error = %e, "birthday: a handshake failed"),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sessions_punch_from_the_peer_is_a_hit() {
        let toward: Vec<SocketAddr> = vec!["203.0.113.2:4000".parse().unwrap()];
        let punch = datagram::punch("s1");
        let peer: SocketAddr = "203.0.113.2:4000".parse().unwrap();
        assert!(from_peer(&punch, peer, "s1", &toward));
        // Its port may differ (the peer's NAT keeps it for easy sides, but
        // a router mapping need not): the IP is what counts.
        assert!(from_peer(
            &punch,
            "203.0.113.2:9".parse().unwrap(),
            "s1",
            &toward
        ));
        assert!(!from_peer(&punch, peer, "s2", &toward));
        assert!(!from_peer(
            &punch,
            "192.0.2.7:4000".parse().unwrap(),
            "s1",
            &toward
        ));
        assert!(!from_peer(b"\x00junk", peer, "s1", &toward));
    }
}
