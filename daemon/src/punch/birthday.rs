//! Birthday probing: the punch when the peer's NAT maps at random.
//!
//! A NAT that maps endpoint-dependently with random ports (most carrier
//! NATs, Linux `--random-fully`) gives the flow toward us a port no one can
//! know in advance, so the timed punch aims at the wrong port. When the
//! other side is easy (endpoint-independent, so its endpoint is known), the
//! two meet by the birthday paradox, as Tailscale does over UDP, and here
//! over TCP too:
//!
//! - the random side opens many sockets and sends from each to the easy
//!   side's endpoint (a punch datagram; a SYN): each opens a mapping on its
//!   NAT, on a random port, that lets the easy endpoint in;
//! - the easy side ([`Prober`]) sends to random ports of the random side's
//!   IP from its punch port (punch datagrams; SYNs), each port once,
//!   paced, until one lands on an open mapping. Over UDP the random side
//!   hears it on one of its sockets and answers (`quic/birthday.rs`). Over
//!   TCP the SYN meets the random side's socket in `SYN_SENT`: a
//!   simultaneous open, as in the timed punch, and both `connect()`s
//!   complete ([`open_tcp`], [`probe_tcp`]).
//!
//! With 256 mappings among 64,512 ports a hit comes after ~250 probes on
//! average; 2,048 miss with p ≈ 0.03 % (`punch_rendezvous::nat`). Counts
//! and rates are the order's, checked against this daemon's limits
//! (`control/order.rs`) and a daemon-wide budget before anything is sent;
//! every SYN also spends the daemon-wide SYN budget ([`super::budget`]).
//!
//! What it needs of the easy side's NAT: what the random side sends before
//! the probe that opens the easy NAT must be dropped there. Home routers
//! and carrier NATs drop it. A NAT that answers unsolicited SYNs with RST
//! kills the random side's SYN_SENT sockets (and their mappings), and a
//! Linux box that *accepts* unsolicited UDP tracks it as a flow to itself,
//! so the probe that follows leaves from another port and misses (README,
//! "Hard NATs"). Decisions (which ports, how many by when) are sans-IO
//! here; the socket code is thin.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use punch_rendezvous::nat::{BirthdayProbe, Strategy, BIRTHDAY_PORTS};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::plan::CandidateKind;
use super::{budget, Established, PunchedStream};

/// The easy side starts probing this long after `at`: the random side's
/// mappings must exist before the first probe reaches its NAT, whatever
/// the two clocks' remaining skew (a few ms once synced).
pub(crate) const PROBE_DELAY: Duration = Duration::from_millis(100);
/// Probes leave in batches this far apart.
pub(crate) const PROBE_TICK: Duration = Duration::from_millis(10);
/// Extra sockets all of this daemon's birthday punches may hold at once
/// (file descriptors: the budget in `control/order.rs` allows about two
/// such punches at a time).
pub(crate) const MAX_OPEN_SOCKETS: usize = 512;
/// Extra sockets open now, all punches together.
static OPEN_SOCKETS: AtomicUsize = AtomicUsize::new(0);
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

/// The easy side's probing, sans IO: which addresses to send to by when.
#[derive(Debug)]
pub(crate) struct Prober {
    ip: IpAddr,
    walk: PortWalk,
    total: u16,
    per_second: u16,
    start: Instant,
    /// When the last batch left: the next is one tick later, so a caller
    /// that fell behind never catches up in a burst.
    last: Option<Instant>,
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
            last: None,
            sent: 0,
            hit: false,
        }
    }

    /// When the next batch is due; `None` once done (a hit, or all sent).
    pub(crate) fn next_at(&self) -> Option<Instant> {
        if self.hit || self.sent >= self.total {
            return None;
        }
        Some(self.last.map_or(self.start, |t| t + PROBE_TICK))
    }

    /// The batch due at `now`, if one is (counted as sent): at most
    /// `per_second` × [`PROBE_TICK`] addresses, one tick after the last.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<SocketAddr> {
        match self.next_at() {
            Some(at) if now >= at => {}
            _ => return Vec::new(),
        }
        self.last = Some(now);
        let n = batch_of(self.per_second).min(self.total - self.sent);
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

/// Probes per tick at `per_second` (at least one).
fn batch_of(per_second: u16) -> u16 {
    (u64::from(per_second) * PROBE_TICK.as_millis() as u64 / 1000).max(1) as u16
}

/// Extra sockets taken from the daemon-wide allowance, given back on drop.
pub(crate) struct Reserved(pub(crate) usize);

impl Reserved {
    /// Up to `want` sockets, fewer when other punches hold the rest.
    pub(crate) fn take(want: usize) -> Self {
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

/// TCP probes in flight at once (sockets): a hit answers within a round
/// trip, a miss is refused at once by a NAT that refuses; the rest wait
/// [`PROBE_HOLD`]. Against a NAT that drops, this caps the rate at 512
/// probes a second.
const MAX_PROBES_INFLIGHT: usize = 256;
/// How long one TCP probe waits for its answer: a probe that lands is
/// answered within a round trip (the random side's SYN-ACK); one to a
/// closed port of a NAT that drops is given up after this.
const PROBE_HOLD: Duration = Duration::from_millis(500);

/// A seed for the probe walk: random, so an observer cannot tell which
/// port comes next (the clock if the OS has no randomness to give).
pub(crate) fn seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

/// The TCP share of a birthday punch, when the order's strategy has one:
/// opening (the random side) or probing (the easy side), each sending
/// its connection on `out`. Returns why nothing connected, if it tried.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_tcp(
    budget: &std::sync::Mutex<budget::SynBudget>,
    port: u16,
    strategy: Option<&Strategy>,
    candidates: &[SocketAddr],
    fire_at: Instant,
    deadline: Instant,
    out: mpsc::Sender<Established>,
) -> Option<String> {
    match strategy {
        Some(Strategy::BirthdayOpen(b)) if b.tcp => {
            let toward = candidates.iter().find(|c| c.is_ipv4()).copied()?;
            let opening = TcpOpening {
                toward,
                sockets: b.sockets,
                ttl_limited: b.ttl_limited,
                fire_at,
                deadline,
            };
            open_tcp(budget, opening, out).await
        }
        Some(Strategy::BirthdayProbe(b)) if b.tcp => {
            probe_tcp(budget, port, b, fire_at, deadline, out).await
        }
        _ => None,
    }
}

/// The candidates the timed TCP punch keeps beside TCP birthday probing:
/// not the peer's public IP, where the timed punch cannot meet.
/// - Probing (the peer is the random side): its observed port is its
///   mapping toward the rendezvous, not toward us.
/// - Opening (we are): the timed punch's SYN leaves our NAT from a random
///   port the peer does not know.
///
/// Either way a NAT that refuses is retried at once after each RST, so that
/// punch would spend the SYN budget as fast as it refills (~2,000 SYNs in
/// a quarter second in the lab) for nothing.
pub(crate) fn timed_candidates(
    strategy: Option<&Strategy>,
    candidates: &[SocketAddr],
) -> Vec<SocketAddr> {
    let peer_ip = match strategy {
        Some(Strategy::BirthdayProbe(b)) if b.tcp => Some(b.ip),
        Some(Strategy::BirthdayOpen(b)) if b.tcp => {
            candidates.iter().find(|c| c.is_ipv4()).map(|c| c.ip())
        }
        _ => None,
    };
    candidates
        .iter()
        .filter(|c| Some(c.ip().to_canonical()) != peer_ip)
        .copied()
        .collect()
}

/// The TTL of the random side's first SYN (and first round of punch
/// datagrams): one hop past a NAT in front of the host, expiring at the
/// next router. So it opens our NAT's mapping without reaching, and
/// drawing a RST from, the peer's NAT (or, over UDP, leaving the peer's
/// NAT a stray flow that would clash with its probes). Everything later
/// goes at the normal TTL: the kernel's SYN retransmission a second on,
/// the SYN-ACK when a probe lands, UDP's later rounds. A host several hops
/// behind its NAT (a carrier NAT) opens its mappings with those instead.
pub(crate) const OPEN_TTL: u32 = 2;
/// While the peer probes, each TTL-limited `SYN_SENT` socket is started
/// afresh from its port this often: sooner than the kernel's own first
/// retransmission (1 s), which would leave at the normal TTL and draw a
/// refusing NAT's RST, ending the socket and its mapping. (Closing a
/// `SYN_SENT` socket sends nothing; the new SYN has the same 4-tuple, so
/// our NAT keeps the same mapping.)
const REARM_EVERY: Duration = Duration::from_millis(900);
/// ...for this long after `at`: the probes' own span (100 ms + 2,048 at
/// 1,000 a second) with a margin for a loaded machine.
const HOLD_FOR: Duration = Duration::from_secs(4);
/// A `SYN_SENT` socket killed by the ICMP "time exceeded" its own
/// TTL-limited SYN drew (Linux ends a connecting socket on it) is started
/// again from the same port this many times at most: its mapping on our
/// NAT is still there, and a probe landing on it must find a socket, not
/// draw our kernel's RST.
const ICMP_RESTARTS: u8 = 3;

/// Starts a connect from `local_port` (0: any) to `to` whose SYN leaves
/// with TTL [`OPEN_TTL`] when `ttl_limited`; later packets use the normal
/// TTL.
fn start_connect(
    local_port: u16,
    to: SocketAddr,
    ttl_limited: bool,
) -> std::io::Result<tokio::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_reuse_address(true)?;
    // Re-armed or dropped half open, it must not linger on its 4-tuple.
    super::set_abortive_close(&s);
    super::buffers::size(&s, super::buffers::Kind::Tcp);
    s.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, local_port)).into())?;
    let normal = s.ttl_v4()?;
    if ttl_limited {
        s.set_ttl_v4(OPEN_TTL)?;
    }
    match s.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // The SYN has left (the kernel sends it inside connect()).
    s.set_ttl_v4(normal)?;
    tokio::net::TcpStream::from_std(s.into())
}

/// Waits for a connect started by [`start_connect`] to complete.
async fn connected(stream: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.peer_addr()?;
    Ok(stream)
}

/// What the random side's TCP opening needs.
struct TcpOpening {
    /// The peer's endpoint (its public IPv4 TCP candidate).
    toward: SocketAddr,
    sockets: u16,
    ttl_limited: bool,
    fire_at: Instant,
    deadline: Instant,
}

/// The random side over TCP: `sockets` SYNs toward the peer's endpoint,
/// each from its own port (one NAT mapping each), TTL-limited
/// ([`OPEN_TTL`]) unless the peer's NAT drops unsolicited SYNs, each
/// socket held in `SYN_SENT` ([`hold_mapping`]) until a probe of the peer
/// meets one of them (a simultaneous open).
async fn open_tcp(
    budget: &std::sync::Mutex<budget::SynBudget>,
    o: TcpOpening,
    out: mpsc::Sender<Established>,
) -> Option<String> {
    let reserved = Reserved::take(usize::from(o.sockets));
    tokio::time::sleep_until(o.fire_at.into()).await;
    let mut holding = FuturesUnordered::new();
    for _ in 0..reserved.0 {
        budget::spend(budget).await;
        match start_connect(0, o.toward, o.ttl_limited) {
            Ok(stream) => {
                let port = stream.local_addr().map_or(0, |a| a.port());
                holding.push(hold_mapping(budget, &o, port, stream));
            }
            Err(e) => {
                warn!(opened = holding.len(), error = %e, "birthday: cannot open more TCP sockets (raise the open-file limit?); punching with fewer mappings");
                break;
            }
        }
    }
    let opened = holding.len();
    if opened == 0 {
        return Some("birthday: no TCP socket to open mappings with".into());
    }
    info!(mappings = opened, toward = %o.toward, ttl_limited = o.ttl_limited, "birthday: opened our NAT toward the peer from many TCP ports; waiting for its probes");
    let (mut refused, mut restarts) = (0, 0);
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = out.closed() => return None,
            r = holding.next() => match r {
                Some((Ok(stream), _)) => {
                    info!(remote = %o.toward, local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0), "birthday: the peer's probe met one of our TCP mappings (simultaneous open)");
                    super::tune_tunnel_socket(&stream);
                    let est = Established { stream: PunchedStream::new(stream), remote: o.toward, kind: CandidateKind::Public, attempts: opened as u32 };
                    let _ = out.send(est).await;
                    return None;
                }
                Some((Err(e), n)) => {
                    restarts += n;
                    if e.kind() == std::io::ErrorKind::ConnectionRefused { refused += 1; }
                    last_error = Some(e.to_string());
                }
                None => break,
            },
        }
    }
    debug!(restarts, "birthday: TCP opening ended");
    Some(if refused * 2 > opened {
        format!("birthday: {refused} of our {opened} TCP mappings were refused (a RST from the peer's NAT, which the TTL-limited SYNs did not avoid: no router between the NATs, or our NAT further than one hop)")
    } else {
        format!(
            "birthday: no probe of the peer met any of our {opened} TCP mappings{}",
            last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        )
    })
}

/// One mapping of the random side: a `SYN_SENT` socket on `port`, kept
/// ready for the peer's probe. TTL-limited, it is started afresh every
/// [`REARM_EVERY`] for [`HOLD_FOR`], and after an ICMP "time exceeded"
/// ([`ICMP_RESTARTS`]). Returns the connection, or why there is none, and
/// how many times it was started again.
async fn hold_mapping(
    budget: &std::sync::Mutex<budget::SynBudget>,
    o: &TcpOpening,
    port: u16,
    first: tokio::net::TcpStream,
) -> (std::io::Result<tokio::net::TcpStream>, u32) {
    let hold_until = o.fire_at + HOLD_FOR;
    let (mut stream, mut restarts, mut icmp) = (first, 0, 0);
    loop {
        let rearm_at = Instant::now() + REARM_EVERY;
        let rearm = o.ttl_limited && port != 0 && rearm_at < hold_until;
        let until = if rearm { rearm_at } else { o.deadline };
        // On a timeout the socket is dropped (closed, nothing sent).
        match tokio::time::timeout_at(until.into(), connected(stream)).await {
            Ok(Ok(s)) => return (Ok(s), restarts),
            Ok(Err(e)) => {
                let expired = matches!(
                    e.raw_os_error(),
                    Some(libc::EHOSTUNREACH | libc::ENETUNREACH)
                );
                if !(expired && port != 0 && icmp < ICMP_RESTARTS && Instant::now() < hold_until) {
                    return (Err(e), restarts);
                }
                icmp += 1;
            }
            Err(_) if !rearm => return (Err(std::io::ErrorKind::TimedOut.into()), restarts),
            Err(_) => {}
        }
        budget::spend(budget).await;
        stream = match start_connect(port, o.toward, o.ttl_limited) {
            Ok(s) => s,
            Err(e) => return (Err(e), restarts),
        };
        restarts += 1;
    }
}

/// The easy side over TCP: SYNs from the punch port to random ports of the
/// peer's IP, paced by a [`Prober`], each waiting at most [`PROBE_HOLD`].
async fn probe_tcp(
    budget: &std::sync::Mutex<budget::SynBudget>,
    port: u16,
    spec: &BirthdayProbe,
    fire_at: Instant,
    deadline: Instant,
    out: mpsc::Sender<Established>,
) -> Option<String> {
    let mut prober = Prober::new(spec, fire_at + PROBE_DELAY, seed());
    let mut inflight = FuturesUnordered::new();
    loop {
        let next = prober
            .next_at()
            .filter(|t| *t < deadline && inflight.len() < MAX_PROBES_INFLIGHT);
        if next.is_none() && inflight.is_empty() {
            break;
        }
        tokio::select! {
            _ = out.closed() => return None,
            _ = tokio::time::sleep_until(next.unwrap_or(deadline).into()), if next.is_some() => {
                for to in prober.due(Instant::now()) {
                    budget::spend(budget).await;
                    inflight.push(async move {
                        (to, tokio::time::timeout(PROBE_HOLD, super::attempt(0, port, to)).await)
                    });
                }
            }
            Some((to, r)) = inflight.next() => {
                if let Ok((_, Ok(stream))) = r {
                    prober.heard(to);
                    info!(remote = %to, probes = prober.sent(), "birthday: a TCP probe met one of the peer's mappings (simultaneous open)");
                    super::tune_tunnel_socket(&stream);
                    let est = Established { stream: PunchedStream::new(stream), remote: to, kind: CandidateKind::Public, attempts: u32::from(prober.sent()) };
                    let _ = out.send(est).await;
                    return None;
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => break,
        }
    }
    debug!(probes = prober.sent(), "birthday: TCP probing ended");
    Some(format!(
        "birthday: none of {} TCP probes met a mapping of the peer",
        prober.sent()
    ))
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
    fn probes_keep_their_rate_and_total_even_when_the_caller_lags() {
        let t0 = Instant::now();
        let spec = |probes, per_second| BirthdayProbe {
            ip: "203.0.113.3".parse().unwrap(),
            probes,
            per_second,
            udp: true,
            tcp: false,
        };
        let mut p = Prober::new(&spec(4096, 1000), t0, 1);
        // Asked every 3 ms, then after a 2 s stall: never more than a
        // batch per tick since the first, however it is called.
        let mut sent = 0u64;
        let mut t = t0;
        for step in 0..3000u64 {
            t += Duration::from_millis(if step == 1000 { 2000 } else { 3 });
            sent += p.due(t).len() as u64;
            let ticks = (t - t0).as_millis() as u64 / 10 + 1;
            assert!(sent <= 10 * ticks, "{sent} probes after {ticks} ticks");
        }
        assert_eq!(
            Prober::new(&spec(10, 50), t0, 1).due(t0).len(),
            1,
            "at least one a tick"
        );
    }

    #[test]
    fn the_prober_paces_stops_on_a_hit_and_stays_on_the_peer() {
        let t0 = Instant::now();
        let spec = BirthdayProbe {
            ip: "203.0.113.3".parse().unwrap(),
            probes: 100,
            per_second: 1000,
            udp: true,
            tcp: false,
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
    fn tcp_birthday_leaves_the_peers_public_ip_out_of_the_timed_punch() {
        let cands: Vec<SocketAddr> = vec![
            "203.0.113.3:4000".parse().unwrap(),
            "198.51.100.2:4000".parse().unwrap(),
        ];
        let probe = |tcp| {
            Strategy::BirthdayProbe(Box::new(BirthdayProbe {
                ip: "203.0.113.3".parse().unwrap(),
                probes: 2048,
                per_second: 1000,
                udp: true,
                tcp,
            }))
        };
        assert_eq!(timed_candidates(Some(&probe(true)), &cands), &cands[1..]);
        assert_eq!(timed_candidates(Some(&probe(false)), &cands), cands);
        assert_eq!(timed_candidates(None, &cands), cands);
        let open = |tcp| {
            Strategy::BirthdayOpen(Box::new(punch_rendezvous::nat::BirthdayOpen {
                sockets: 256,
                udp: true,
                tcp,
                ttl_limited: true,
            }))
        };
        assert_eq!(timed_candidates(Some(&open(true)), &cands), &cands[1..]);
        assert_eq!(timed_candidates(Some(&open(false)), &cands), cands);
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
}
