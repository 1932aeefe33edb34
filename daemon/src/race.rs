//! Racing the direct paths of one punch session (timed TCP simultaneous
//! open, UDP hole punch + QUIC) and agreeing with the peer on one.
//!
//! Both engines run at once, from the same `at`. Every connection that
//! authenticates with the pinned key becomes a candidate tunnel. The two
//! ends must keep the *same* one, and they may see candidates in different
//! orders, so one side decides and says so in-band:
//!
//! - the client (lower key) keeps the first candidate that authenticates
//!   (TCP: the best kind after a short grace, LAN before public), opens a
//!   stream on it asking for `_select:<session>`, and waits for the yes;
//! - the server keeps every candidate open until one carries that request,
//!   answers it, and drops the rest.
//!
//! Whatever is not chosen is dropped when this returns: losing TCP
//! connections are closed, losing QUIC connections closed with the
//! endpoint's goodbye.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt as _};
use punch_config::TransportKind;
use punch_rendezvous::protocol::PunchOrder;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::metered::Metered;
use crate::peer::PeerContext;
use crate::punch::plan::{PunchPlan, Role};
use crate::punch::{self, Established};
use crate::quic::punch::{QuicEstablished, QuicPunch};
use crate::relay;
use crate::status::Transport;
use crate::tunnel::{self, TunnelParts};

/// How long the TLS client waits after the first TCP connection for a
/// better one (a LAN candidate) before choosing.
const CHOOSE_GRACE: Duration = Duration::from_millis(20);
/// How long the chosen side waits for the other's verdict, at least.
const SELECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a punched connection that failed its TLS handshake may take to
/// send its FIN before it is aborted and punched again. Short: when our
/// direction is the dead one the FIN never leaves (it waits behind the
/// unacknowledged handshake), and the peer, which saw the failure at the
/// same moment, is already punching again.
const FAILED_FIN_WAIT: Duration = Duration::from_millis(50);
/// Prefix of the selection request (a reserved service name: `_` cannot
/// start a configured one).
const SELECT_PREFIX: &str = "_select:";

/// The kept direct path.
pub(crate) struct Direct {
    pub(crate) parts: TunnelParts,
    pub(crate) remote: SocketAddr,
    pub(crate) attempts: u32,
}

/// Why no direct path was kept, and the attempts made.
#[derive(Debug)]
pub(crate) struct NoDirect {
    pub(crate) reason: String,
    pub(crate) attempts: u32,
    /// No allowed transport could even start (QUIC alone, and the peer's
    /// UDP endpoint not yet known): worth asking again soon rather than
    /// relaying at once.
    pub(crate) nothing_to_try: bool,
}

/// Punches every allowed transport and returns the path both ends keep.
pub(crate) async fn punch_direct(
    ctx: &PeerContext,
    order: &PunchOrder,
    fire_at: Instant,
    deadline: Instant,
    port: u16,
) -> Result<Direct, NoDirect> {
    let use_tcp = ctx.transports.contains(&TransportKind::Tcp);
    let quic = ctx
        .quic
        .as_ref()
        .filter(|_| ctx.transports.contains(&TransportKind::Quic))
        .filter(|_| !order.udp_candidates.is_empty());
    if ctx.transports.contains(&TransportKind::Quic) && quic.is_none() {
        info!("no QUIC this time: the peer has no UDP endpoint (QUIC off there, or its probes did not reach the rendezvous)");
    }
    if !use_tcp && quic.is_none() {
        return Err(NoDirect {
            reason: "nothing to punch with: transports allow QUIC only, and the peer has no UDP endpoint yet".to_owned(),
            attempts: 0,
            nothing_to_try: true,
        });
    }
    info!(tcp = ?use_tcp.then_some(&order.candidates), quic = ?quic.map(|_| &order.udp_candidates), in_ms = fire_at.saturating_duration_since(Instant::now()).as_millis() as u64, "punching");

    let (tcp_tx, mut tcp_rx) = mpsc::channel::<Established>(4);
    let (repunch_tx, repunch_rx) = mpsc::channel::<SocketAddr>(4);
    let tcp_engine = async {
        let plan = PunchPlan::new(order.candidates.clone(), fire_at, deadline);
        punch::run(port, plan, fire_at, tcp_tx, repunch_rx).await
    };
    let mut tcp_engine = std::pin::pin!(tcp_engine);
    let mut tcp_done = !use_tcp;

    let (quic_tx, mut quic_rx) = mpsc::channel::<QuicEstablished>(4);
    let mut incoming = match (quic, ctx.role) {
        (Some(_), Role::Server) => Some(ctx.quic_incoming.lock().await),
        _ => None,
    };
    let quic_engine = async {
        match quic {
            Some(path) => {
                let p = QuicPunch {
                    path,
                    session: &order.session,
                    peer: &ctx.key,
                    role: ctx.role,
                    candidates: &order.udp_candidates,
                    fire_at,
                    deadline,
                };
                Some(crate::quic::punch::run(p, incoming.as_deref_mut(), quic_tx).await)
            }
            None => None,
        }
    };
    let mut quic_engine = std::pin::pin!(quic_engine);
    let mut quic_done = quic.is_none();

    let mut attempts = 0u32;
    let mut errors: Vec<String> = Vec::new();
    let mut waiting: Vec<Established> = Vec::new();
    let mut choose_at: Option<Instant> = None;
    let mut handshakes = FuturesUnordered::new();
    let mut selecting = FuturesUnordered::new();
    let tls = |est: Established| {
        let Established {
            stream,
            remote,
            attempts,
            ..
        } = est;
        let closer = stream.fin_closer();
        let io = Metered::new(stream, ctx.status.clone());
        async move {
            let r = tunnel::handshake(io, ctx.role, &ctx.identity, &ctx.key, Transport::Tcp).await;
            if r.is_err() {
                // Punched again on the same ports next: close with a FIN
                // so that the NATs let the new SYNs reopen their entries.
                if let Some(c) = closer {
                    c.close(FAILED_FIN_WAIT).await;
                }
            }
            (remote, attempts, r)
        }
    };
    loop {
        let grace = choose_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let mut authenticated: Option<Direct> = None;
        tokio::select! {
            s = &mut tcp_engine, if !tcp_done => {
                tcp_done = true;
                attempts = attempts.max(s.attempts);
                if let Some(e) = s.last_error { errors.push(format!("tcp: no candidate connected (last error: {e})")); }
            }
            s = &mut quic_engine, if !quic_done => {
                quic_done = true;
                if let Some(s) = s {
                    attempts = attempts.max(s.rounds);
                    if let Some(e) = s.last_error { errors.push(format!("quic: {e}")); }
                    if s.heard == 0 {
                        if let Some(path) = quic { path.rebind_if_idle("UDP punch heard nothing"); }
                    }
                }
            }
            Some(est) = tcp_rx.recv() => match ctx.role {
                Role::Server => handshakes.push(tls(est)),
                Role::Client => {
                    waiting.push(est);
                    choose_at.get_or_insert_with(|| Instant::now() + CHOOSE_GRACE);
                }
            },
            Some(q) = quic_rx.recv() => {
                if let Some(path) = quic {
                    authenticated = Some(Direct {
                        remote: q.conn.remote_address(),
                        parts: tunnel::from_quic(q.conn, ctx.status.clone(), path.clone()),
                        attempts: q.rounds,
                    });
                }
            }
            _ = tokio::time::sleep_until(grace.into()), if choose_at.is_some() => {}
            Some((remote, attempts, r)) = handshakes.next() => match r {
                Ok(parts) => authenticated = Some(Direct { parts, remote, attempts }),
                Err(e) => {
                    // A wrong key fails at once; a connection whose bytes
                    // stopped somewhere after the SYNs got through (a NAT
                    // that mistracked it) times out. Either way both ends
                    // see it fail within a round trip, and the engine
                    // punches that candidate again if it may.
                    warn!(%remote, error = %e, "connection punched but not authenticated; dropping it");
                    errors.push(format!("tcp: TLS with {remote} failed: {e}"));
                    let _ = repunch_tx.try_send(remote);
                }
            },
            Some(r) = selecting.next() => match r {
                Ok(d) => return Ok(d),
                Err(e) => errors.push(e),
            },
        }
        if let Some(mut d) = authenticated {
            match ctx.role {
                Role::Client => match select_path(&mut d, &order.session).await {
                    Ok(()) => return Ok(d),
                    Err(e) => {
                        warn!(remote = %d.remote, error = %e, "peer did not take the path we chose; trying others");
                        errors.push(e);
                    }
                },
                Role::Server => selecting.push(await_selection(d, &order.session, deadline)),
            }
        }
        // The TLS client handshakes one TCP connection at a time, best
        // kind first.
        let chosen = ctx.role == Role::Client
            && handshakes.is_empty()
            && choose_at.is_some_and(|t| Instant::now() >= t || tcp_done);
        if chosen && !waiting.is_empty() {
            waiting.sort_by_key(|e| e.kind);
            handshakes.push(tls(waiting.remove(0)));
        }
        let idle = handshakes.is_empty()
            && selecting.is_empty()
            && waiting.is_empty()
            && tcp_rx.is_empty()
            && quic_rx.is_empty();
        if tcp_done && quic_done && idle {
            let reason = if errors.is_empty() {
                "no connection established".to_owned()
            } else {
                errors.join("; ")
            };
            return Err(NoDirect {
                reason,
                attempts,
                nothing_to_try: false,
            });
        }
    }
}

/// Runs `f` on a fresh tunnel while keeping its driver polled (streams
/// move only while it runs); the tunnel closing first is an error.
async fn with_driver<T>(
    parts: &mut TunnelParts,
    f: impl AsyncFnOnce(&tunnel::Tunnel, &mut mpsc::Receiver<tunnel::StreamIo>) -> Result<T, String>,
) -> Result<T, String> {
    let TunnelParts {
        tunnel,
        inbound,
        driver,
    } = parts;
    tokio::select! {
        r = f(tunnel, inbound) => r,
        () = driver => Err("tunnel closed before the path was chosen".to_owned()),
    }
}

/// Client: tells the server this is the path, and waits for its yes.
async fn select_path(d: &mut Direct, session: &str) -> Result<(), String> {
    let ask = format!("{SELECT_PREFIX}{session}");
    let choose = with_driver(&mut d.parts, async |tunnel, _| {
        let mut s = tunnel.open().await.map_err(|e| e.to_string())?;
        s.uncount();
        relay::request_service(&mut s, &ask)
            .await
            .map_err(|e| format!("selecting the path: {e}"))
    });
    tokio::time::timeout(SELECT_TIMEOUT, choose)
        .await
        .map_err(|_| "no answer to the path selection".to_owned())?
}

/// Server: waits (until the punch deadline, at least [`SELECT_TIMEOUT`])
/// for the client to choose this path.
fn await_selection(
    mut d: Direct,
    session: &str,
    deadline: Instant,
) -> impl Future<Output = Result<Direct, String>> + '_ {
    let until = deadline.max(Instant::now() + SELECT_TIMEOUT);
    async move {
        let expected = format!("{SELECT_PREFIX}{session}");
        let wait = with_driver(&mut d.parts, async |_, inbound| {
            let mut s = inbound
                .recv()
                .await
                .ok_or_else(|| "tunnel closed".to_owned())?;
            s.uncount();
            let asked = relay::read_request(&mut s)
                .await
                .map_err(|e| e.to_string())?;
            if asked != expected {
                let _ = relay::reply(&mut s, Err("not the path of this session")).await;
                return Err(format!("peer asked for {asked:?} on a fresh path"));
            }
            relay::reply(&mut s, Ok(()))
                .await
                .map_err(|e| e.to_string())
        });
        match tokio::time::timeout_at(until.into(), wait).await {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) => Err(format!("path at {} not chosen: {e}", d.remote)),
            Err(_) => Err(format!("path at {} not chosen in time", d.remote)),
        }
    }
}
