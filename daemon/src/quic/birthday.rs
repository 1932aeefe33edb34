//! Birthday probing: the UDP punch when the peer's NAT maps at random.
//!
//! A NAT that maps endpoint-dependently with random ports (most carrier
//! NATs, Linux `--random-fully`) gives the flow toward us a port no one can
//! know in advance, so the timed punch aims at the wrong port. When the
//! other side is easy (endpoint-independent, so its endpoint is known), the
//! two meet by the birthday paradox, as Tailscale does:
//!
//! - the random side ([`open`]) opens many sockets and sends a punch
//!   datagram from each to the easy side's endpoint: each opens a mapping
//!   on its NAT, on a random port, that lets the easy endpoint in;
//! - the easy side ([`Prober`]) sends punch datagrams from its punch socket
//!   to random ports of the random side's IP, each port once, paced, until
//!   one lands on an open mapping. The random side hears it on one of its
//!   sockets and answers; the easy side hears the answer through its own
//!   NAT (its probe opened it), and the QUIC handshake follows over that
//!   socket pair like any punch.
//!
//! With 256 mappings among 64,512 ports a hit comes after ~250 probes on
//! average; 2,048 miss with p ≈ 0.03 % (`punch_rendezvous::nat`). The
//! counts and rates are the order's, checked against this daemon's limits
//! (`control/order.rs`) and a daemon-wide budget before anything is sent.
//!
//! What it needs of the easy side's NAT: a datagram from the random side
//! arriving before the probe that opens it must be dropped, not tracked.
//! Home routers and carrier NATs drop it. A Linux box that *accepts*
//! unsolicited input tracks it as a flow to itself, and the probe that
//! follows then leaves from another port and misses (README, "Hard NATs").
//! Decisions (which ports, how many by when) are sans-IO here; [`open`] is
//! the thin socket code of the random side.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use punch_config::PublicKeyBytes;
use punch_rendezvous::datagram;
use punch_rendezvous::nat::{BirthdayProbe, BIRTHDAY_PORTS};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::punch::QuicEstablished;
use super::QuicPath;
use crate::path::Role;

/// The easy side starts probing this long after `at`: the random side's
/// mappings must exist before the first probe reaches its NAT, whatever
/// the two clocks' remaining skew (a few ms once synced).
pub(crate) const PROBE_DELAY: Duration = Duration::from_millis(100);
/// Probes leave in batches this far apart.
pub(crate) const PROBE_TICK: Duration = Duration::from_millis(10);
/// When the random side sends from every socket, after `at`: the first
/// round opens the mappings, the later ones refresh them (a Linux NAT
/// forgets an unanswered UDP mapping after 30 s) and stand in for a first
/// datagram lost on the way to the NAT.
const OPEN_ROUNDS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(4),
];
/// Extra sockets all of this daemon's birthday punches may hold at once
/// (file descriptors: the budget in `control/order.rs` allows about two
/// such punches at a time).
const MAX_OPEN_SOCKETS: usize = 512;
/// Extra sockets open now, all punches together.
static OPEN_SOCKETS: AtomicUsize = AtomicUsize::new(0);
/// The most peer IPs the random side sends toward (the order's IPv4 UDP
/// candidates: the observed endpoint and perhaps a router-mapped one).
const MAX_TOWARD: usize = 2;

/// A walk over [`BIRTHDAY_PORTS`] that visits each port at most once, from
/// a random start with a random stride coprime with the range's length, so
/// probes never repeat and an observer cannot tell which comes next.
#[derive(Debug, Clone)]
pub(crate) struct PortWalk {
    first: u64,
    stride: u64,
    step: u64,
}

/// How many ports the walk covers (64,512).
fn range_len() -> u64 {
    u64::from(*BIRTHDAY_PORTS.end() - *BIRTHDAY_PORTS.start()) + 1
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl PortWalk {
    pub(crate) fn new(seed: u64) -> Self {
        let len = range_len();
        let mut stride = ((seed >> 24) % len) | 1;
        while gcd(stride, len) != 1 {
            stride = (stride + 2) % len;
        }
        Self {
            first: seed % len,
            stride,
            step: 0,
        }
    }
}

impl Iterator for PortWalk {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        let len = range_len();
        if self.step >= len {
            return None;
        }
        let offset = (self.first + self.step * self.stride) % len;
        self.step += 1;
        // offset < len, so the sum stays within u16.
        Some(*BIRTHDAY_PORTS.start() + offset as u16)
    }
}

/// Probes due `elapsed` after the first batch: one batch at once, then
/// `per_second`, never more than `total`.
pub(crate) fn probes_due(elapsed: Duration, per_second: u16, total: u16) -> u16 {
    let batch = (u64::from(per_second) * PROBE_TICK.as_millis() as u64 / 1000).max(1);
    let paced = batch + (elapsed.as_micros() as u64 * u64::from(per_second)) / 1_000_000;
    paced.min(u64::from(total)) as u16
}

/// The easy side's probing, sans IO: which addresses to send to by when.
#[derive(Debug)]
pub(crate) struct Prober {
    ip: IpAddr,
    walk: PortWalk,
    total: u16,
    per_second: u16,
    start: Instant,
    sent: u16,
    /// Set once the peer was heard from its IP: no more probes.
    hit: bool,
}

impl Prober {
    pub(crate) fn new(spec: &BirthdayProbe, start: Instant, seed: u64) -> Self {
        Self {
            ip: spec.ip,
            walk: PortWalk::new(seed),
            total: spec.probes,
            per_second: spec.per_second,
            start,
            sent: 0,
            hit: false,
        }
    }

    /// When the next batch is due; `None` once done (a hit, or all sent).
    pub(crate) fn next_at(&self) -> Option<Instant> {
        if self.hit || self.sent >= self.total {
            return None;
        }
        Some(self.start + PROBE_TICK * u32::from(self.sent / batch_of(self.per_second)))
    }

    /// The addresses due at `now` (counted as sent).
    pub(crate) fn due(&mut self, now: Instant) -> Vec<SocketAddr> {
        if self.hit || now < self.start {
            return Vec::new();
        }
        let due = probes_due(now - self.start, self.per_second, self.total);
        let n = due.saturating_sub(self.sent);
        let ports: Vec<SocketAddr> = self
            .walk
            .by_ref()
            .take(usize::from(n))
            .map(|p| SocketAddr::new(self.ip, p))
            .collect();
        self.sent += ports.len() as u16;
        if ports.len() < usize::from(n) {
            // The walk is exhausted (more probes than ports): done.
            self.total = self.sent;
        }
        ports
    }

    /// The peer was heard from `from`: a hit if it is the probed IP.
    pub(crate) fn heard(&mut self, from: SocketAddr) -> bool {
        if from.ip().to_canonical() == self.ip && !self.hit {
            self.hit = true;
            return true;
        }
        false
    }

    pub(crate) fn sent(&self) -> u16 {
        self.sent
    }
}

fn batch_of(per_second: u16) -> u16 {
    (u64::from(per_second) * PROBE_TICK.as_millis() as u64 / 1000).max(1) as u16
}

/// Extra sockets taken from the daemon-wide allowance, given back on drop.
struct Reserved(usize);

impl Reserved {
    /// Up to `want` sockets, fewer when other punches hold the rest.
    fn take(want: usize) -> Self {
        let mut got = 0;
        let _ = OPEN_SOCKETS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
            got = want.min(MAX_OPEN_SOCKETS.saturating_sub(open));
            Some(open + got)
        });
        Self(got)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        OPEN_SOCKETS.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// What the random side's share of a birthday punch needs.
pub(crate) struct Opening<'a> {
    pub(crate) path: &'a QuicPath,
    pub(crate) session: &'a str,
    pub(crate) peer: &'a PublicKeyBytes,
    pub(crate) role: Role,
    /// The peer's UDP candidates (only IPv4 ones are used).
    pub(crate) candidates: &'a [SocketAddr],
    pub(crate) sockets: u16,
    pub(crate) fire_at: Instant,
    pub(crate) deadline: Instant,
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
pub(crate) async fn open(o: Opening<'_>) -> Result<QuicEstablished, String> {
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
    let reserved = Reserved::take(usize::from(o.sockets));
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
            "birthday: no socket to open mappings with ({} of {} allowed: other punches hold the daemon's {MAX_OPEN_SOCKETS})",
            reserved.0, o.sockets
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
                for s in &sockets {
                    for to in &toward {
                        let _ = s.send_to(&punch, to).await;
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
    use std::collections::HashSet;

    #[test]
    fn the_walk_visits_every_port_once_in_a_seeded_order() {
        for seed in [0u64, 1, 0xdead_beef_cafe, u64::MAX] {
            let ports: Vec<u16> = PortWalk::new(seed).collect();
            assert_eq!(ports.len() as u64, range_len(), "seed {seed}");
            let distinct: HashSet<u16> = ports.iter().copied().collect();
            assert_eq!(distinct.len(), ports.len(), "a port repeated, seed {seed}");
            assert!(ports.iter().all(|p| BIRTHDAY_PORTS.contains(p)));
        }
        let a: Vec<u16> = PortWalk::new(7 << 30).take(8).collect();
        let b: Vec<u16> = PortWalk::new(9 << 30 | 3).take(8).collect();
        assert_ne!(a, b, "different seeds walk differently");
        // Not a sequential sweep.
        assert!(a.windows(2).any(|w| w[1] != w[0].wrapping_add(1)));
    }

    #[test]
    fn probes_keep_their_rate_and_total() {
        let ms = Duration::from_millis;
        assert_eq!(probes_due(ms(0), 1000, 2048), 10);
        assert_eq!(probes_due(ms(500), 1000, 2048), 510);
        assert_eq!(probes_due(ms(60_000), 1000, 2048), 2048);
        assert_eq!(probes_due(ms(0), 50, 2048), 1, "at least one at once");
        // Never more than a batch plus the rate over any elapsed time.
        for t in (0..5000).step_by(7) {
            let due = u64::from(probes_due(ms(t), 1000, 4096));
            assert!(due <= 10 + t, "{due} probes due at {t} ms");
        }
    }

    #[test]
    fn the_prober_paces_stops_on_a_hit_and_stays_on_the_peer() {
        let t0 = Instant::now();
        let spec = BirthdayProbe {
            ip: "203.0.113.3".parse().unwrap(),
            probes: 100,
            per_second: 1000,
        };
        let mut p = Prober::new(&spec, t0, 42);
        assert_eq!(p.next_at(), Some(t0));
        assert!(p.due(t0 - Duration::from_millis(1)).is_empty());
        let first = p.due(t0);
        assert_eq!(first.len(), 10);
        assert!(first.iter().all(|a| a.ip() == spec.ip));
        assert!(p.due(t0).is_empty(), "nothing more due at the same instant");
        assert_eq!(p.next_at(), Some(t0 + PROBE_TICK));
        let mut all: Vec<SocketAddr> = first;
        let mut t = t0;
        while let Some(at) = p.next_at() {
            t = at.max(t + PROBE_TICK);
            all.extend(p.due(t));
        }
        assert_eq!(all.len(), 100, "the total, no more");
        assert_eq!(p.sent(), 100);
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 100);
        // A hit from another IP does not stop it; one from the peer does.
        let mut p = Prober::new(&spec, t0, 42);
        assert!(!p.heard("198.51.100.9:4000".parse().unwrap()));
        assert!(p.heard("[::ffff:203.0.113.3]:4000".parse().unwrap()));
        assert_eq!(p.next_at(), None);
        assert!(p.due(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn the_daemon_wide_socket_allowance_is_shared_and_given_back() {
        let a = Reserved::take(400);
        let b = Reserved::take(400);
        assert!(a.0 + b.0 <= MAX_OPEN_SOCKETS);
        drop(a);
        drop(b);
        let c = Reserved::take(256);
        assert_eq!(c.0, 256);
    }

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
