//! The punch engine: fires timed, non-blocking `connect()`s from the punch
//! port at every candidate, following [`plan::PunchPlan`], and hands each
//! connection that establishes to the caller.
//!
//! The socket work is deliberately thin. Every attempt is a fresh socket
//! bound to the punch port with SO_REUSEADDR + SO_REUSEPORT (a socket that
//! saw a RST cannot be reused) and `connect()`ed; nothing here ever calls
//! `listen()`, so the punch port never appears in `ss -ltn`.

pub(crate) mod birthday;
pub(crate) mod budget;
pub(crate) mod family;
pub(crate) mod plan;
mod stream;

pub(crate) use stream::{set_abortive_close, PunchedStream};

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use plan::{Action, CandidateKind, Outcome, PunchPlan};

/// A connection the punch produced.
#[derive(Debug)]
pub(crate) struct Established {
    pub(crate) stream: PunchedStream,
    pub(crate) remote: SocketAddr,
    pub(crate) kind: CandidateKind,
    /// Attempts made until this one connected.
    pub(crate) attempts: u32,
}

/// What the engine did, for status and the result report.
#[derive(Debug, Clone, Default)]
pub(crate) struct PunchStats {
    pub(crate) attempts: u32,
    /// The last error seen, when nothing connected.
    pub(crate) last_error: Option<String>,
    /// A candidate was refused without a break until given up, and none
    /// connected ([`PunchPlan::refused_throughout`]): keep the ports quiet
    /// for a while.
    pub(crate) refused_throughout: bool,
}

/// Binds a socket to `port` on the unspecified address of `family`, shared
/// with the rendezvous connection and every other punch socket.
pub(crate) fn bind_punch_socket(family: SocketAddr, port: u16) -> io::Result<TcpSocket> {
    let (sock, ip) = match family {
        SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(SocketAddr::new(ip, port))?;
    Ok(sock)
}

/// Unsent bytes the kernel keeps queued on a tunnel socket beyond what is
/// in flight. Without a limit, a bulk stream fills the (autotuned, up to
/// `tcp_wmem` max: 4 MiB) send buffer, and a keepalive or an interactive
/// stream's frame waits behind all of it: 183 ms against 42 ms idle in
/// issue 18. With it, the kernel still keeps the congestion window full
/// (the limit is on top of what is in flight), and the backlog stays in
/// the mux, where streams take turns.
pub(crate) const TUNNEL_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Tunes a punched connection: no Nagle delay, a bounded unsent queue
/// (`TUNNEL_NOTSENT_LOWAT`), and TCP keepalive so the kernel also notices
/// a dead path and the NAT mapping sees traffic even when the tunnel is
/// idle. Buffer sizes are left to Linux's autotuning: pinning SO_SNDBUF or
/// SO_RCVBUF turns it off and caps the window at what was pinned.
fn tune_tunnel_socket(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(TUNNEL_NOTSENT_LOWAT);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Sleeps until `t` with sub-millisecond precision: the tokio timer wakes
/// us within ~1 ms, and the last stretch is a short spin. On a LAN the
/// window for a simultaneous open is a one-way delay, often far below 1 ms.
pub(crate) async fn sleep_precise(t: Instant) {
    const SPIN: Duration = Duration::from_millis(2);
    if let Some(coarse) = t.checked_sub(SPIN) {
        tokio::time::sleep_until(coarse.into()).await;
    }
    while Instant::now() < t {
        std::hint::spin_loop();
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => Outcome::Refused,
        _ => Outcome::Failed,
    }
}

async fn attempt(i: usize, port: u16, addr: SocketAddr) -> (usize, io::Result<TcpStream>) {
    let result = async {
        let sock = bind_punch_socket(addr, port)?;
        sock.connect(addr).await
    }
    .await;
    (i, result)
}

/// Runs the plan, sending each established connection on `out`, until the
/// deadline, until every candidate connected for good, or until `out` is
/// closed (the caller has its tunnel). An address sent on `repunch` is a
/// connection the caller could not use: its candidate is punched again.
/// Every attempt spends a token of the daemon-wide `budget` first.
pub(crate) async fn run(
    budget: &std::sync::Mutex<budget::SynBudget>,
    port: u16,
    mut plan: PunchPlan,
    fire_at: Instant,
    out: mpsc::Sender<Established>,
    mut repunch: mpsc::Receiver<SocketAddr>,
) -> PunchStats {
    let mut stats = PunchStats::default();
    let mut inflight = FuturesUnordered::new();
    sleep_precise(fire_at).await;
    loop {
        let wake = match plan.poll(Instant::now()) {
            Action::Start(i) => {
                budget::spend(budget).await;
                inflight.push(attempt(i, port, plan.candidate(i)));
                continue;
            }
            Action::WaitUntil(t) => t,
            Action::Exhausted => break,
        };
        tokio::select! {
            _ = out.closed() => break,
            _ = tokio::time::sleep_until(wake.into()) => {}
            Some(addr) = repunch.recv() => {
                if plan.repunch(addr, Instant::now()) {
                    tracing::info!(remote = %addr, "punching that candidate again");
                }
            }
            Some((i, result)) = inflight.next() => {
                let now = Instant::now();
                match result {
                    Ok(stream) => {
                        plan.on_outcome(i, now, Outcome::Connected);
                        tune_tunnel_socket(&stream);
                        let est = Established { stream: PunchedStream::new(stream), remote: plan.candidate(i), kind: plan.kind(i), attempts: plan.attempts() };
                        tracing::debug!(remote = %est.remote, attempts = est.attempts, "punched");
                        if out.send(est).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        plan.on_outcome(i, now, classify(&e));
                        stats.last_error = Some(format!("{}: {e}", plan.candidate(i)));
                    }
                }
            }
        }
    }
    stats.attempts = plan.attempts();
    stats.refused_throughout = plan.refused_throughout();
    stats
}
