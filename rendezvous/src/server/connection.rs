//! One daemon's WebSocket: challenge, signed hello, then the registered
//! loop that answers pings, coordinates punches and forwards orders.
//!
//! The rules (names, sessions, limits) are the [`super::store`]'s; this
//! module is the socket around them and the delivery of what they decide.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use punch_config::PeerName;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::auth::constant_time_eq;
use super::cluster;
use super::lan;
use super::metrics::{AddrRefusal, PunchRefusal};
use super::ratelimit::TokenBucket;
use super::store::{PunchBound, PunchLimits, Registration, StoreError};
use super::Shared;
use crate::protocol::{
    b64, decode_public_key, sign_order, unix_time_us, verify_challenge, ClientMsg, ErrorCode,
    Hello, PathKind, ServerMsg, NONCE_LEN, PROTOCOL_VERSION,
};

/// Punch orders queued for one daemon before it counts as too slow.
const OUTBOX: usize = 16;
/// A daemon that cannot take a message for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

type Refusal = (ErrorCode, String);

/// Serves one upgraded WebSocket until it closes or the server stops.
pub(crate) async fn serve(mut ws: WebSocket, addr: SocketAddr, shared: Arc<Shared>) {
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let observed = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let span = tracing::info_span!("daemon", conn = conn_id, addr = %observed, name = tracing::field::Empty);
    async move {
        let (tx, rx) = mpsc::channel(OUTBOX);
        let replaced = CancellationToken::new();
        match handshake(&mut ws, &shared, conn_id, observed, tx, replaced.clone()).await {
            Ok(None) => debug!("observe-only hello answered"),
            Ok(Some((name, nonce))) => {
                tracing::Span::current().record("name", name.as_str());
                shared.metrics.connected.fetch_add(1, Ordering::Relaxed);
                info!("registered");
                let me = Me { name: &name, nonce };
                let reason = registered(&mut ws, &shared, me, rx, &replaced).await;
                match shared.store.unregister(&name, conn_id).await {
                    Ok(true) => {
                        info!(%reason, "unregistered");
                        abort_sessions_of(&shared, &name).await;
                    }
                    Ok(false) => debug!(%reason, "connection closed after being replaced"),
                    Err(e) => warn!(%reason, error = %e, "could not unregister"),
                }
                shared.metrics.connected.fetch_sub(1, Ordering::Relaxed);
            }
            Err((code, message)) => {
                shared.metrics.refused(code);
                info!(code = code.as_str(), %message, "refused");
                let _ = send(&mut ws, &ServerMsg::Error { code, message }).await;
            }
        }
        shared.local.detach(conn_id);
        let _ = tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::Close(None))).await;
    }
    .instrument(span)
    .await;
}

/// Challenge → hello → welcome. Returns the registered name and the nonce
/// of this registration, or `None` for an observe-only hello (the
/// daemon's endpoint in its other address family, recorded on its
/// registration and answered with a welcome; the connection then ends).
async fn handshake(
    ws: &mut WebSocket,
    shared: &Shared,
    conn_id: u64,
    observed: SocketAddr,
    tx: mpsc::Sender<ServerMsg>,
    replaced: CancellationToken,
) -> Result<Option<(String, [u8; NONCE_LEN])>, Refusal> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| {
        (
            ErrorCode::ShuttingDown,
            format!("server has no randomness: {e}"),
        )
    })?;
    let challenge = ServerMsg::Challenge {
        version: PROTOCOL_VERSION,
        nonce: b64(&nonce),
    };
    send(ws, &challenge)
        .await
        .map_err(|_| (ErrorCode::Timeout, "could not send challenge".to_owned()))?;
    let hello = tokio::select! {
        _ = shared.cancel.cancelled() => return Err((ErrorCode::ShuttingDown, "server is shutting down".to_owned())),
        r = tokio::time::timeout(shared.cfg().limits.hello_timeout, next_text(ws)) => match r {
            Err(_) => return Err((ErrorCode::Timeout, "no hello in time".to_owned())),
            Ok(None) => return Err((ErrorCode::Timeout, "closed before hello".to_owned())),
            Ok(Some(text)) => text,
        },
    };
    let hello = match serde_json::from_str::<ClientMsg>(&hello) {
        Ok(ClientMsg::Hello(h)) => h,
        Ok(_) => {
            return Err((
                ErrorCode::NotRegistered,
                "send hello before anything else".to_owned(),
            ))
        }
        Err(e) => return Err((ErrorCode::Malformed, format!("bad hello: {e}"))),
    };
    let public_key = check_hello(&shared.cfg(), &hello, &nonce)?;
    if hello.observe_only {
        return observe_only(ws, shared, &hello.name, public_key, observed).await;
    }
    let local_addrs = lan_candidates(shared, &hello.local_addrs, observed)?;
    let registration = Registration {
        conn_id,
        public_key,
        observed,
        local_addrs,
        nonce,
        udp_port: hello.udp_port.filter(|p| *p != 0),
        udp_observed: None,
        alt_observed: None,
        alt_udp_observed: None,
        mapped_tcp: mapped_candidate(shared, hello.mapped_tcp, observed),
        mapped_udp: mapped_candidate(shared, hello.mapped_udp, observed),
        nat: hello.nat,
        probe_counter: 0,
        // The daemon's own measure until its pings report one (0: none).
        rtt_us: hello.rtt_us.unwrap_or(0),
        instance: None,
    };
    // Reachable before registered, so no order finds a name without an
    // outbox; `serve` detaches it whatever happens.
    shared.local.attach(conn_id, tx, replaced, Instant::now());
    let registered = shared
        .store
        .register(&hello.name, registration, shared.cfg().limits.max_clients)
        .await
        .map_err(StoreError::into_refusal)?;
    if let Some(old) = registered.replaced {
        shared.local.replace(old);
    }
    let welcome = ServerMsg::Welcome {
        observed_addr: observed,
        server_time_us: unix_time_us(),
        udp_port: shared.udp_port,
        server_key: Some(b64(shared.key.verifying_key().as_bytes())),
        observe_only: true,
    };
    if send(ws, &welcome).await.is_err() {
        let _ = shared.store.unregister(&hello.name, conn_id).await;
        return Err((ErrorCode::Timeout, "could not send welcome".to_owned()));
    }
    Ok(Some((hello.name, nonce)))
}

/// An observe-only hello (checked like any other): `observed` becomes the
/// registered daemon's endpoint in its other address family, and the
/// welcome tells the daemon what we saw. Refused `not_registered` when the
/// name is not registered with that key, or was seen over this family
/// already (only the registration itself says that one).
async fn observe_only(
    ws: &mut WebSocket,
    shared: &Shared,
    name: &str,
    public_key: [u8; 32],
    observed: SocketAddr,
) -> Result<Option<(String, [u8; NONCE_LEN])>, Refusal> {
    let recorded = shared
        .store
        .observe_alt(name, public_key, observed)
        .await
        .map_err(StoreError::into_refusal)?;
    if !recorded {
        return Err((
            ErrorCode::NotRegistered,
            "observe-only hello: register first, over the other address family".to_owned(),
        ));
    }
    info!(daemon = name, alt = %observed, "endpoint in the other address family observed");
    let welcome = ServerMsg::Welcome {
        observed_addr: observed,
        server_time_us: unix_time_us(),
        udp_port: shared.udp_port,
        server_key: Some(b64(shared.key.verifying_key().as_bytes())),
        observe_only: true,
    };
    send(ws, &welcome)
        .await
        .map_err(|_| (ErrorCode::Timeout, "could not send welcome".to_owned()))?;
    Ok(None)
}

/// The hello's `local_addrs` that may be passed on as candidates
/// ([`super::lan`]); each one dropped is logged and counted, and a hello
/// with more than [`lan::MAX_LOCAL_ADDRS`] is refused.
fn lan_candidates(
    shared: &Shared,
    addrs: &[SocketAddr],
    observed: SocketAddr,
) -> Result<Vec<SocketAddr>, Refusal> {
    if addrs.len() > lan::MAX_LOCAL_ADDRS {
        shared.metrics.addr_refused(AddrRefusal::TooMany);
        return Err((
            ErrorCode::Malformed,
            format!(
                "{} local addresses; at most {} are accepted",
                addrs.len(),
                lan::MAX_LOCAL_ADDRS
            ),
        ));
    }
    let mut kept = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match lan::check(*addr, observed.ip()) {
            Ok(a) if !kept.contains(&a) => kept.push(a),
            Ok(_) => {}
            Err(why) => {
                shared.metrics.addr_refused(why);
                info!(%addr, reason = why.as_str(), "local address not passed on as a candidate");
            }
        }
    }
    Ok(kept)
}

/// A hello's router-mapped endpoint, kept only on the IP we observe the
/// daemon at (where its router's public address is) and with a port: any
/// other address would let a daemon aim its peers' punches at a third
/// host. A refusal is logged and counted, and the daemon still registers.
fn mapped_candidate(
    shared: &Shared,
    mapped: Option<SocketAddr>,
    observed: SocketAddr,
) -> Option<SocketAddr> {
    let addr = mapped?;
    let ip = addr.ip().to_canonical();
    if ip == observed.ip().to_canonical() && addr.port() != 0 {
        return Some(SocketAddr::new(ip, addr.port()));
    }
    shared.metrics.addr_refused(AddrRefusal::MappedNotObserved);
    info!(%addr, %observed, "mapped endpoint not on the observed address; not passed on as a candidate");
    None
}

/// Token first (an outsider learns nothing else), then version, name, key
/// and the signature over our nonce.
fn check_hello(
    cfg: &punch_config::RendezvousConfig,
    hello: &Hello,
    nonce: &[u8],
) -> Result<[u8; 32], Refusal> {
    if let Some(expected) = &cfg.token {
        let given = hello.token.as_deref().unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
            return Err((
                ErrorCode::BadToken,
                "missing or wrong network token; set [rendezvous] token to the server's".to_owned(),
            ));
        }
    }
    if hello.version != PROTOCOL_VERSION {
        return Err((
            ErrorCode::VersionMismatch,
            format!(
                "protocol version {} is not supported (server speaks {PROTOCOL_VERSION}); upgrade punchd or the server",
                hello.version
            ),
        ));
    }
    PeerName::parse(&hello.name).map_err(|e| (ErrorCode::Malformed, e))?;
    let key = decode_public_key(&hello.public_key)
        .map_err(|e| (ErrorCode::BadSignature, e.to_string()))?;
    let token = hello.token.as_deref();
    verify_challenge(&key, nonce, &hello.name, token, &hello.signature).map_err(|_| {
        (
            ErrorCode::BadSignature,
            "hello signature does not match its name, key, token and this connection's nonce"
                .to_owned(),
        )
    })?;
    Ok(key.to_bytes())
}

/// A protocol violation (oversize, bad framing) is refused and counted; a
/// plain network error (reset, EOF) is just a lost connection.
fn frame_error(e: axum::Error) -> Option<Refusal> {
    use tungstenite::error::Error as WsError;
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(
            WsError::Io(_)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
        ) => None,

        Some(other) => Some((ErrorCode::Malformed, format!("bad frame: {other}"))),
        None => Some((ErrorCode::Malformed, format!("bad frame: {inner}"))),
    }
}

/// Who this connection registered as: what its orders are signed for.
#[derive(Clone, Copy)]
struct Me<'a> {
    name: &'a str,
    nonce: [u8; NONCE_LEN],
}

/// The registered loop. Returns why it ended, for the log.
async fn registered(
    ws: &mut WebSocket,
    shared: &Shared,
    me: Me<'_>,
    mut outbox: mpsc::Receiver<ServerMsg>,
    replaced: &CancellationToken,
) -> String {
    let name = me.name;
    let cfg = shared.cfg();
    let limits = &cfg.limits;
    let mut bucket = TokenBucket::new(
        limits.messages_per_second,
        limits.message_burst,
        Instant::now(),
    );
    loop {
        let refusal = tokio::select! {
            _ = shared.cancel.cancelled() => Some((ErrorCode::ShuttingDown, "server is shutting down; reconnect shortly".to_owned())),
            _ = replaced.cancelled() => Some((ErrorCode::Replaced, "this name registered again from another connection".to_owned())),
            Some(mut msg) = outbox.recv() => {
                // Signed here, where the recipient's registration is known:
                // an order is good for this daemon on this connection only.
                if let ServerMsg::Punch(order) = &mut msg {
                    sign_order(&shared.key, me.name, &me.nonce, order);
                }
                if send(ws, &msg).await.is_err() {
                    return "send failed or timed out".to_owned();
                }
                None
            }
            incoming = tokio::time::timeout(limits.idle_timeout, ws.recv()) => match incoming {
                Err(_) => Some((ErrorCode::Timeout, "idle for too long".to_owned())),
                Ok(None) => return "closed by daemon".to_owned(),
                Ok(Some(Err(e))) => match frame_error(e) {
                    Some(refusal) => Some(refusal),
                    None => return "connection lost".to_owned(),
                },
                Ok(Some(Ok(msg))) => {
                    if !bucket.allow(Instant::now()) {
                        Some((ErrorCode::RateLimited, format!("more than {} messages per second", limits.messages_per_second)))
                    } else {
                        match msg {
                            Message::Text(text) => handle(ws, shared, name, text.as_str()).await,
                            Message::Binary(_) => Some((ErrorCode::Malformed, "binary messages are not part of the protocol".to_owned())),
                            Message::Close(_) => return "closed by daemon".to_owned(),
                            Message::Ping(_) | Message::Pong(_) => None,
                        }
                    }
                }
            },
        };
        if let Some((code, message)) = refusal {
            shared.metrics.refused(code);
            warn!(code = code.as_str(), %message, "closing connection");
            let _ = send(
                ws,
                &ServerMsg::Error {
                    code,
                    message: message.clone(),
                },
            )
            .await;
            return message;
        }
    }
}

/// Handles one text message. `Some` closes the connection with that error.
async fn handle(ws: &mut WebSocket, shared: &Shared, name: &str, text: &str) -> Option<Refusal> {
    let msg = match serde_json::from_str::<ClientMsg>(text) {
        Ok(m) => m,
        Err(e) => return Some((ErrorCode::Malformed, format!("unreadable message: {e}"))),
    };
    match msg {
        ClientMsg::Ping { id, rtt_us } => {
            if let Some(rtt) = rtt_us {
                if let Err(e) = shared.store.set_rtt(name, rtt).await {
                    debug!(error = %e, "RTT not recorded");
                }
            }
            let pong = ServerMsg::Pong {
                id,
                server_time_us: unix_time_us(),
            };
            send(ws, &pong)
                .await
                .err()
                .map(|_| (ErrorCode::Timeout, "pong not sent".to_owned()))
        }
        ClientMsg::Connect { peer } => {
            if let Err((code, message)) = coordinate(shared, name, &peer).await {
                shared.metrics.refused(code);
                info!(%peer, code = code.as_str(), "punch refused");
                let err = ServerMsg::Error { code, message };
                if send(ws, &err).await.is_err() {
                    return Some((ErrorCode::Timeout, "error not sent".to_owned()));
                }
            }
            None
        }
        ClientMsg::Result(r) => {
            let known = match shared
                .store
                .report(&r.session, name, r.path == PathKind::Relayed)
                .await
            {
                Ok(known) => known,
                Err(e) => {
                    warn!(session = %r.session, error = %e, "result not recorded");
                    false
                }
            };

            if known {
                shared.metrics.result(r.path);
                match r.path {
                    PathKind::None => {
                        info!(session = %r.session, reason = ?r.reason, "punch failed")
                    }
                    path => {
                        info!(session = %r.session, ?path, elapsed_ms = r.elapsed_ms, attempts = r.attempts, "punch result")
                    }
                }
            }
            None
        }
        ClientMsg::Hello(_) => Some((ErrorCode::Malformed, "already registered".to_owned())),
    }
}

/// Creates a punch session and delivers both orders. If either cannot
/// be queued the session is withdrawn (and a side that got its order is
/// told the punch is off), so an undeliverable punch holds no slot.
async fn coordinate(shared: &Shared, name: &str, peer: &str) -> Result<(), Refusal> {
    let limits = PunchLimits {
        max_pending: shared.cfg().limits.max_pending_punches,
        max_per_requester: shared.cfg().limits.max_pending_punches_per_daemon,
    };
    let orders = match shared
        .store
        .coordinate(name, peer, unix_time_us(), limits)
        .await
    {
        Ok(orders) => orders,
        Err(e) => {
            if let StoreError::OverBound { bound, .. } = &e {
                shared.metrics.punch_refused(match bound {
                    PunchBound::Server => PunchRefusal::ServerCap,
                    PunchBound::Requester => PunchRefusal::RequesterCap,
                });
            }
            return Err(e.into_refusal());
        }
    };
    let session = orders[0].order.session.clone();
    let mut delivered = Vec::with_capacity(2);
    for addressed in orders {
        let to = addressed.to.clone();
        if cluster::deliver(shared, &to, ServerMsg::Punch(addressed.order)).is_err() {
            shared.metrics.punch_refused(PunchRefusal::Undelivered);
            if let Err(e) = shared.store.withdraw(&session).await {
                warn!(%session, error = %e, "undelivered punch session not withdrawn");
            }
            for other in delivered {
                let _ = cluster::deliver(
                    shared,
                    &other,
                    ServerMsg::PunchAborted {
                        session: session.clone(),
                        // Only the requester's order goes first.
                        peer: peer.to_owned(),
                    },
                );
            }
            return Err((
                ErrorCode::Busy,
                "the peer's connection is backed up; retry shortly".to_owned(),
            ));
        }
        delivered.push(to);
    }
    shared.metrics.punches.fetch_add(1, Ordering::Relaxed);
    info!(%peer, %session, "punch coordinated");
    Ok(())
}

async fn send(ws: &mut WebSocket, msg: &ServerMsg) -> Result<(), ()> {
    let text = serde_json::to_string(msg).map_err(|_| ())?;
    match tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// The next text message, skipping control frames; `None` on close/error.
async fn next_text(ws: &mut WebSocket) -> Option<String> {
    loop {
        match ws.recv().await? {
            Ok(Message::Text(t)) => return Some(t.as_str().to_owned()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(_) | Err(_) => return None,
        }
    }
}

/// Tells the other side of every fresh session of `name` that `name` is
/// gone, so it stops punching towards a daemon that may never have seen its
/// order (e.g. a NAT dropped that daemon's connection and the order with it).
async fn abort_sessions_of(shared: &Shared, name: &str) {
    let others = match shared
        .store
        .take_fresh_sessions_of(name, unix_time_us())
        .await
    {
        Ok(others) => others,
        Err(e) => {
            warn!(error = %e, "cannot abort this daemon's punch sessions");
            return;
        }
    };
    for (session, to) in others {
        info!(%session, "aborting punch session: a side disconnected");
        let _ = cluster::deliver(
            shared,
            &to,
            ServerMsg::PunchAborted {
                session,
                peer: name.to_owned(),
            },
        );
    }
}
