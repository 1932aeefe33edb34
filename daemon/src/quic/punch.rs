//! One session's UDP hole punch.
//!
//! At `at` both sides send a small punch datagram from the UDP punch socket
//! to every UDP candidate of the other, and repeat on a fixed schedule. A
//! datagram out opens our NAT for the peer's endpoint; the peer's datagram
//! arriving proves its NAT is open for us. UDP has no RST, so an early
//! datagram is merely dropped by the far NAT and the next one gets through.
//!
//! The client (lower key) starts QUIC towards an address only once it has
//! *heard* a punch datagram from it: by then both NATs pass the pair, and
//! the address is where the peer really is (a NAT that re-maps shows up
//! here rather than as a dead candidate). The server answers every punch
//! it hears and waits for the connection on the shared endpoint, which the
//! accept loop authenticates and routes to this peer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use punch_config::PublicKeyBytes;
use punch_rendezvous::datagram;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::birthday::{self, Opening};
use super::QuicPath;
use crate::path::Role;
use crate::punch::birthday::{Prober, PROBE_DELAY};
use crate::punch::sleep_precise;
use punch_rendezvous::nat::Strategy;

/// Punch datagram rounds: right at `at`, then backing off to this spacing.
const ROUND_SPACING: [u64; 7] = [0, 20, 40, 80, 160, 320, 640];
/// Spacing of the rounds after those.
const STEADY_SPACING: Duration = Duration::from_millis(500);
/// Addresses the client dials per session (candidates plus re-mapped ones).
const MAX_DIALS: usize = 4;
/// Distinct addresses answered per punch session (the peer has at most a
/// few: its observed and local endpoints, a NAT rebinding).
const MAX_HEARD: usize = 16;

/// A QUIC connection, authenticated with the peer's pinned key.
#[derive(Debug)]
pub(crate) struct QuicEstablished {
    pub(crate) conn: quinn::Connection,
    /// The punch round during which the peer was first heard (1: the
    /// first datagrams crossed).
    pub(crate) rounds: u32,
}

/// How the UDP punch went, when it ends without (more) connections.
#[derive(Debug, Default)]
pub(crate) struct QuicStats {
    pub(crate) rounds: u32,
    /// Distinct addresses heard from.
    pub(crate) heard: usize,
    pub(crate) last_error: Option<String>,
}

/// What one UDP punch needs.
pub(crate) struct QuicPunch<'a> {
    pub(crate) path: &'a QuicPath,
    pub(crate) session: &'a str,
    pub(crate) peer: &'a PublicKeyBytes,
    pub(crate) role: Role,
    pub(crate) candidates: &'a [SocketAddr],
    pub(crate) fire_at: Instant,
    pub(crate) deadline: Instant,
    /// The order's hard-NAT strategy; birthday probing changes the punch.
    pub(crate) strategy: Option<&'a Strategy>,
}

/// When round `n` leaves, relative to `at`.
fn round_offset(n: u32) -> Duration {
    match ROUND_SPACING.get(n as usize) {
        Some(ms) => Duration::from_millis(*ms),
        None => {
            let last = Duration::from_millis(ROUND_SPACING[ROUND_SPACING.len() - 1]);
            last + STEADY_SPACING * (n + 1 - ROUND_SPACING.len() as u32)
        }
    }
}

/// Punches until the deadline, sending each authenticated connection on
/// `out` (the caller picks one and drops the rest, and stops this future
/// when it is done). `incoming` carries the accept loop's connections
/// from this peer (server role only).
pub(crate) async fn run(
    p: QuicPunch<'_>,
    mut incoming: Option<&mut mpsc::Receiver<quinn::Connection>>,
    out: mpsc::Sender<QuicEstablished>,
) -> QuicStats {
    let mut stats = QuicStats::default();
    let (_guard, mut heard_rx) = p.path.demux.session(p.session);
    // Connections left over from an earlier session are stale.
    if let Some(rx) = incoming.as_deref_mut() {
        while let Ok(c) = rx.try_recv() {
            c.close(quinn::VarInt::from_u32(2), b"stale");
        }
    }
    let probe = datagram::punch(p.session);
    // Birthday probing: the easy side probes the peer's IP; the random
    // side opens many mappings and waits on them, beside the plain punch.
    let mut prober = match p.strategy {
        Some(Strategy::BirthdayProbe(b)) if b.udp => Some(Prober::new(
            b,
            p.fire_at + PROBE_DELAY,
            crate::punch::birthday::seed(),
        )),
        _ => None,
    };
    let open = match p.strategy {
        Some(Strategy::BirthdayOpen(b)) if b.udp => Some(b),
        _ => None,
    };
    let mut opening_running = open.is_some();
    let opening = async {
        match open {
            Some(b) => {
                birthday::open(Opening {
                    punch: &p,
                    sockets: b.sockets,
                    ttl_limited: b.ttl_limited,
                })
                .await
            }
            None => std::future::pending().await,
        }
    };
    let mut opening = std::pin::pin!(opening);
    sleep_precise(p.fire_at).await;
    let mut heard = HashSet::new();
    let mut heard_in_round = 0;
    let mut dialing = FuturesUnordered::new();
    let mut next_round = p.fire_at;
    loop {
        let round_due = next_round < p.deadline;
        let probe_at = prober
            .as_ref()
            .and_then(Prober::next_at)
            .filter(|t| *t < p.deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(next_round.into()), if round_due => {
                for c in p.candidates {
                    if let Err(e) = p.path.send_to(&probe, *c).await {
                        stats.last_error = Some(format!("UDP send to {c}: {e}"));
                    }
                }
                stats.rounds += 1;
                next_round = p.fire_at + round_offset(stats.rounds);
            }
            _ = tokio::time::sleep_until(probe_at.unwrap_or(p.deadline).into()), if probe_at.is_some() => {
                if let Some(pr) = prober.as_mut() {
                    for to in pr.due(Instant::now()) {
                        if let Err(e) = p.path.send_to(&probe, to).await {
                            stats.last_error = Some(format!("UDP send to {to}: {e}"));
                        }
                    }
                }
            }
            Some(from) = heard_rx.recv() => {
                if let Some(pr) = prober.as_mut() {
                    if pr.heard(from) {
                        info!(%from, probes = pr.sent(), "birthday: a probe landed on one of the peer's mappings");
                    }
                }
                // Each new address costs a reply (and maybe a dial): only the
                // first MAX_HEARD per session, so datagrams from many spoofed
                // sources neither grow the set nor aim our replies.
                if heard.len() < MAX_HEARD && heard.insert(from) {
                    if heard_in_round == 0 { heard_in_round = stats.rounds.max(1); }
                    debug!(%from, rounds = stats.rounds, "heard the peer's UDP punch");
                    // Answer at once: its NAT sees our datagram come back.
                    let _ = p.path.send_to(&probe, from).await;
                    if p.role == Role::Client && heard.len() <= MAX_DIALS {
                        match p.path.connect(from, p.peer) {
                            Ok(connecting) => dialing.push(async move { (from, connecting.await) }),
                            Err(e) => stats.last_error = Some(format!("QUIC connect to {from}: {e}")),
                        }
                    }
                }
            }
            Some((from, r)) = dialing.next() => match r {
                Ok(conn) => {
                    info!(remote = %from, heard_in_round, "QUIC connection authenticated");
                    if out.send(QuicEstablished { conn, rounds: heard_in_round.max(1) }).await.is_err() { break }
                }
                Err(e) => stats.last_error = Some(format!("QUIC handshake with {from}: {e}")),
            },
            r = &mut opening, if opening_running => {
                opening_running = false;
                match r {
                    Ok(est) => {
                        info!(remote = %est.conn.remote_address(), "QUIC connection authenticated over a birthday mapping");
                        if out.send(est).await.is_err() { break }
                    }
                    Err(e) => stats.last_error = Some(e),
                }
            }
            Some(conn) = async { match incoming.as_deref_mut() { Some(rx) => rx.recv().await, None => None } } => {
                info!(remote = %conn.remote_address(), heard_in_round, "QUIC connection accepted and authenticated");
                if out.send(QuicEstablished { conn, rounds: heard_in_round.max(1) }).await.is_err() { break }
            }
            _ = tokio::time::sleep_until(p.deadline.into()) => break,
        }
    }
    if let Some(pr) = &prober {
        info!(probes = pr.sent(), "birthday: probing ended");
    }
    stats.heard = heard.len();
    if stats.last_error.is_none() && heard.is_empty() {
        stats.last_error = Some(format!(
            "no UDP punch heard from the peer after {} rounds",
            stats.rounds
        ));
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_back_off_then_hold_steady() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(round_offset(0), ms(0));
        assert_eq!(round_offset(1), ms(20));
        assert_eq!(round_offset(6), ms(640));
        assert_eq!(round_offset(7), ms(1140));
        assert_eq!(round_offset(8), ms(1640));
        // A 10 s punch sends about 25 rounds per candidate, no more.
        assert!((0..40).filter(|n| round_offset(*n) < ms(10_000)).count() <= 25);
    }
}
