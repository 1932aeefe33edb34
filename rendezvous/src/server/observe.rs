//! NAT discovery's answers: "the source address I saw".
//!
//! The daemon (and `punchd netcheck`) asks from one local port: the main
//! listener (`GET /v1/observe`, and `observe` datagrams on the UDP
//! observation socket) and the second endpoint, `observe_port`, on TCP
//! (the address as one text line, then close) and UDP (`observe`
//! datagrams). Comparing the two answers tells whether the NAT keeps one
//! mapping per local port (endpoint-independent) or makes a new one per
//! destination (endpoint-dependent), and with a second local port, whether
//! new mappings step predictably.
//!
//! Nothing here needs registration, so nothing is learned but the asker's
//! own address. Each answer is bounded and cheap: one datagram no longer
//! than the question (no amplification), or one line written without
//! waiting; per-source and server-wide rate limits refuse the rest,
//! counted in `punch_rendezvous_observe_refused_total`.
//!
//! **What the NAT does with an unsolicited SYN.** After its line, a TCP
//! asker may write `inbound\n`. The server then sends one SYN from another
//! port of its own address to the asker's observed endpoint (the mapping
//! of this very connection, so nothing but the asker is ever contacted)
//! and writes what came of it: `inbound rst` (refused: the NAT, or the
//! host behind it, answered with RST), `inbound dropped` (nothing within
//! [`INBOUND_WAIT`]), `inbound reached` (a connection: the mapping takes
//! unsolicited connections), or `inbound unreachable` (an ICMP error).
//! Birthday probing needs to know: an easy NAT that answers RST must not
//! see the random side's opening SYNs. At most [`MAX_INBOUND_TESTS`] run
//! at once (one task each, [`ASK_WAIT`] + [`INBOUND_WAIT`] at most); beyond
//! that, or without the question, the connection closes after the line
//! as before.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::Json;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, info};

use super::udp::{answer_observe, ObserveLimits as Limits};
use super::Shared;
use crate::datagram;

/// Answers and refusals, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// [tcp, udp]
    answered: [AtomicU64; 2],
    refused: [AtomicU64; 2],
}

/// Which transport.
#[derive(Debug, Clone, Copy)]
enum Via {
    Tcp = 0,
    Udp = 1,
}

impl Counters {
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            (
                "punch_rendezvous_observe_answered_total",
                "NAT discovery questions answered with the source address seen.",
                &self.answered,
            ),
            (
                "punch_rendezvous_observe_refused_total",
                "NAT discovery questions refused by a rate limit.",
                &self.refused,
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (i, t) in ["tcp", "udp"].iter().enumerate() {
                out.push_str(&format!(
                    "{name}{{transport=\"{t}\"}} {}\n",
                    v[i].load(Ordering::Relaxed)
                ));
            }
        }
        out
    }

    /// An `observe` datagram answered (`ok`) or refused.
    pub(crate) fn count_udp(&self, ok: bool) {
        self.count(Via::Udp, ok);
    }

    fn count(&self, via: Via, ok: bool) {
        let v = if ok { &self.answered } else { &self.refused };
        v[via as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// What `GET /v1/observe` answers: the address seen and where the other
/// endpoints are.
#[derive(Debug, Serialize)]
pub(crate) struct Observation {
    /// The source address of this request.
    observed: SocketAddr,
    /// The UDP observation port (same host), if bound.
    udp_port: Option<u16>,
    /// The second endpoint's port (TCP and UDP, same host), if bound.
    observe_port: Option<u16>,
}

pub(crate) async fn http_handler(
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    State(shared): State<Arc<Shared>>,
) -> Json<Observation> {
    shared.observe.count(Via::Tcp, true);
    Json(Observation {
        observed: SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        udp_port: shared.udp_port,
        observe_port: shared.observe_port,
    })
}

/// The second endpoint's two sockets.
pub(crate) struct Sockets {
    tcp: TcpListener,
    udp: UdpSocket,
}

/// Binds `observe_port` on `listen`'s address: TCP and UDP both, or
/// neither. An explicit port that cannot be bound is an error; the
/// default (`listen` + 1) only warns.
pub(crate) fn bind(
    listen: SocketAddr,
    configured: Option<u16>,
) -> std::io::Result<Option<Sockets>> {
    let port = match configured {
        Some(0) => return Ok(None),
        Some(p) => p,
        None => match listen.port().checked_add(1) {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let addr = SocketAddr::new(listen.ip(), port);
    match super::bind::same_port(addr) {
        Ok((tcp, udp)) => Ok(Some(Sockets { tcp, udp })),
        Err(e) if configured.is_some() => Err(std::io::Error::new(
            e.kind(),
            format!("observe_port {addr}: {e}"),
        )),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot bind the NAT discovery endpoint (listen port + 1); daemons will report their NAT mapping as unknown (set observe_port)");
            Ok(None)
        }
    }
}

impl Sockets {
    /// Sockets the caller already holds (see [`super::Bound::new`]).
    pub(crate) fn new(tcp: TcpListener, udp: UdpSocket) -> Self {
        Self { tcp, udp }
    }

    pub(crate) fn port(&self) -> Option<u16> {
        self.tcp.local_addr().ok().map(|a| a.port())
    }
}

/// Serves both sockets until the server shuts down.
pub(crate) async fn serve(s: Sockets, shared: Arc<Shared>) {
    if let Ok(addr) = s.tcp.local_addr() {
        info!(%addr, "NAT discovery endpoint listening (TCP and UDP)");
    }
    let mut tcp_limits = Limits::new(Instant::now());
    let mut udp_limits = Limits::new(Instant::now());
    let inbound_slots = Arc::new(Semaphore::new(MAX_INBOUND_TESTS));
    let mut buf = [0u8; datagram::MAX_LEN + 1];
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = s.tcp.accept() => match r {
                Ok((conn, from)) => {
                    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                    let ok = tcp_limits.allow(from.ip(), Instant::now());
                    shared.observe.count(Via::Tcp, ok);
                    if ok {
                        // A fresh socket's send buffer is empty: one short
                        // line never blocks. Then it closes (FIN), unless
                        // a slot is free to hear an `inbound` question.
                        let _ = conn.try_write(format!("{from}\n").as_bytes());
                        if let Ok(slot) = inbound_slots.clone().try_acquire_owned() {
                            let cancel = shared.cancel.clone();
                            shared.tracker.spawn(async move {
                                let _slot = slot;
                                tokio::select! {
                                    _ = cancel.cancelled() => {}
                                    _ = inbound_test(conn, from) => {}
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, "observe accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            r = s.udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                    if let Some(Some(reply)) = answer_observe(&shared, &mut udp_limits, &buf[..n], from) {
                        let _ = s.udp.send_to(&reply, from).await;
                    }
                }
                Err(e) => debug!(error = %e, "observe receive error"),
            },
        }
    }
}

/// Unsolicited-SYN tests running at once (one task and two sockets each).
pub(crate) const MAX_INBOUND_TESTS: usize = 32;
/// How long the asker has to write `inbound` after the line.
pub(crate) const ASK_WAIT: Duration = Duration::from_millis(300);
/// How long the SYN waits for an answer before it counts as dropped:
/// under the kernel's first retransmission (1 s), so one SYN is all. A
/// RST takes one round trip; on a path longer than this a refusing NAT
/// reads as dropping (birthday probing then opens without a TTL limit).
pub(crate) const INBOUND_WAIT: Duration = Duration::from_millis(500);

/// Waits for `inbound\n` on `conn`, then tries an unsolicited connection
/// to `from` (the asker's own observed endpoint) and writes the verdict.
async fn inbound_test(mut conn: TcpStream, from: SocketAddr) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(ASK_WAIT, conn.read(&mut buf)).await {
        Ok(Ok(n)) if &buf[..n] == b"inbound\n" => {}
        _ => return,
    }
    let local = match conn.local_addr() {
        Ok(a) => a.ip().to_canonical(),
        Err(_) => return,
    };
    let verdict = unsolicited_syn(SocketAddr::new(local, 0), from).await;
    debug!(%from, verdict, "unsolicited SYN test");
    let _ = conn
        .write_all(format!("inbound {verdict}\n").as_bytes())
        .await;
}

/// One SYN from `local` (another port of the address the asker reached)
/// to `to`: what happened to it, in the words the daemon parses.
async fn unsolicited_syn(local: SocketAddr, to: SocketAddr) -> &'static str {
    let sock = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let Ok(sock) = sock.and_then(|s| {
        s.bind(local)?;
        Ok(s)
    }) else {
        return "unknown";
    };
    match tokio::time::timeout(INBOUND_WAIT, sock.connect(to)).await {
        Ok(Ok(_)) => "reached",
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => "rst",
        Ok(Err(_)) => "unreachable",
        Err(_) => "dropped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[tokio::test]
    async fn an_unsolicited_syn_is_refused_reached_or_dropped() {
        // Nothing listens: refused (RST).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(unsolicited_syn(any, closed_addr).await, "rst");
        // A listener takes it.
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(
            unsolicited_syn(any, open.local_addr().unwrap()).await,
            "reached"
        );
    }

    #[tokio::test]
    async fn the_inbound_question_is_answered_on_the_same_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let asker = tokio::spawn(async move {
            let mut c = TcpStream::connect(to).await.unwrap();
            c.write_all(b"inbound\n").await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        });
        let (conn, from) = listener.accept().await.unwrap();
        inbound_test(conn, from).await;
        // The asker's own port is a connected socket: its host refuses.
        assert_eq!(asker.await.unwrap(), "inbound rst\n");
        // No question: nothing is tried, nothing written.
        let asker = tokio::spawn(async move {
            let mut c = TcpStream::connect(to).await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        });
        let (conn, from) = listener.accept().await.unwrap();
        inbound_test(conn, from).await;
        assert_eq!(asker.await.unwrap(), "");
    }

    #[test]
    fn one_ip_is_held_to_its_rate() {
        let t0 = Instant::now();
        let mut l = Limits::new(t0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, super::super::udp::OBSERVE_BURST_PER_IP as usize);
        assert!(l.allow("192.0.2.2".parse().unwrap(), t0));
    }
}
