//! A rendezvous load generator: many signed WebSocket clients that register
//! and stay connected, and optionally pairs of them asking for punches as
//! fast as the server coordinates them.
//!
//! Each client is a real daemon as far as the server can tell: its own
//! Ed25519 key, a signed hello over the server's nonce, pings. Used for the
//! memory-per-daemon and coordinations-per-second figures in BENCHMARKS.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use ed25519_dalek::SigningKey;
use futures::{SinkExt as _, StreamExt as _};
use punch_rendezvous::protocol::{
    b64, decode_nonce, sign_challenge, ClientMsg, Hello, PathKind, PunchResult, ServerMsg,
    PROTOCOL_VERSION,
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::harness::stats::percentile;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// What a load run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Clients registered and held.
    pub clients: usize,
    /// Time to register them all.
    pub register_secs: f64,
    /// Punch coordinations completed (both orders received).
    pub coordinations: u64,
    /// Over this many seconds.
    pub coordination_secs: f64,
    /// Coordinations per second.
    pub per_second: f64,
    /// connect sent → second order received, p50, ms.
    pub p50_ms: f64,
    /// ... p99, ms.
    pub p99_ms: f64,
    /// Refusals seen (server errors).
    pub errors: u64,
}

pub(crate) async fn recv(ws: &mut Ws) -> Result<ServerMsg> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed"),
        }
    }
}

pub(crate) async fn send(ws: &mut Ws, msg: &ClientMsg) -> Result<()> {
    ws.send(Message::text(serde_json::to_string(msg)?)).await?;
    Ok(())
}

/// Registers one client named `name`.
pub async fn register(addr: SocketAddr, name: &str, seed: u64) -> Result<Ws> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = 0xA5;
    register_as(addr, name, &SigningKey::from_bytes(&bytes), |_| {}).await
}

/// Registers as `name` with `key`, the hello as `shape` leaves it (a
/// client that claims addresses of its choosing: `suites::attack`).
pub(crate) async fn register_as(
    addr: SocketAddr,
    name: &str,
    key: &SigningKey,
    shape: impl FnOnce(&mut Hello),
) -> Result<Ws> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;

    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/v1/ws"), tcp).await?;
    let ServerMsg::Challenge { nonce, .. } = recv(&mut ws).await? else {
        bail!("no challenge")
    };
    let nonce = decode_nonce(&nonce).map_err(|e| anyhow!("{e}"))?;
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        public_key: b64(key.verifying_key().as_bytes()),
        local_addrs: vec![],
        udp_port: None,
        mapped_tcp: None,
        mapped_udp: None,
        nat: None,
        rtt_us: None,
        token: None,
        signature: sign_challenge(key, &nonce, name, None),
        observe_only: false,
    };
    shape(&mut hello);
    send(&mut ws, &ClientMsg::Hello(hello)).await?;
    match recv(&mut ws).await? {
        ServerMsg::Welcome { .. } => Ok(ws),
        other => bail!("registration refused: {other:?}"),
    }
}

/// Registers the clients numbered `ids` (named `load-N`, so processes
/// run side by side take distinct ranges), holds them for `hold`, and if
/// `pairs` > 0 has that many pairs ask for punches back to back for `hold`.
///
/// With several `addrs` (rendezvous instances sharing Redis), client `i`
/// registers on `addrs[i % n]`; the two clients of a pair (`2p`, `2p + 1`)
/// then sit on different instances, so every coordination crosses them.
pub async fn run(
    addrs: &[SocketAddr],
    ids: std::ops::Range<usize>,
    pairs: usize,
    hold: Duration,
) -> Result<LoadReport> {
    if addrs.is_empty() {
        bail!("no rendezvous address");
    }
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let mut set = tokio::task::JoinSet::new();
    let (first, clients) = (ids.start, ids.len());
    for i in 0..clients {
        let gate = gate.clone();
        let addr = addrs[i % addrs.len()];
        let id = first + i;
        set.spawn(async move {
            let _permit = gate.acquire().await;
            (i, register(addr, &format!("load-{id}"), id as u64).await)
        });
    }
    let mut sockets: Vec<Option<Ws>> = (0..clients).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, ws) = r?;
        sockets[i] = Some(ws.with_context(|| format!("client {i}"))?);
    }
    let mut report = LoadReport {
        clients,
        register_secs: t0.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let pairs = pairs.min(clients / 2);
    let mut latencies = Vec::new();
    let started = Instant::now();
    if pairs > 0 {
        let mut tasks = tokio::task::JoinSet::new();
        for p in 0..pairs {
            let (a, b) = (sockets[2 * p].take(), sockets[2 * p + 1].take());
            let (Some(mut a), Some(mut b)) = (a, b) else {
                continue;
            };
            let peer = format!("load-{}", first + 2 * p + 1);
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let end = Instant::now() + hold;
                while Instant::now() < end {
                    let t = Instant::now();
                    if send(&mut a, &ClientMsg::Connect { peer: peer.clone() })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let wait = Duration::from_secs(2);
                    match tokio::time::timeout(wait, recv(&mut a)).await {
                        Ok(Ok(ServerMsg::Punch(order))) => {
                            if !matches!(
                                tokio::time::timeout(wait, recv(&mut b)).await,
                                Ok(Ok(ServerMsg::Punch(_)))
                            ) {
                                break;
                            }
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            // Report like a daemon does, which frees the session.
                            for ws in [&mut a, &mut b] {
                                let result = ClientMsg::Result(PunchResult {
                                    session: order.session.clone(),
                                    path: PathKind::Direct,
                                    elapsed_ms: 1,
                                    attempts: 1,
                                    reason: None,
                                });
                                if send(ws, &result).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Ok(Ok(ServerMsg::Error { .. })) => {
                            errors += 1;
                            // Refused (busy, rate limited): back off a little.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => break,
                    }
                }
                (lat, errors, a, b)
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (lat, errors, _a, _b) = r?;
            latencies.extend(lat);
            report.errors += errors;
        }
    } else {
        tokio::time::sleep(hold).await;
    }
    report.coordination_secs = started.elapsed().as_secs_f64();
    latencies.sort_by(|x, y| x.total_cmp(y));
    report.coordinations = latencies.len() as u64;
    report.per_second = report.coordinations as f64 / report.coordination_secs.max(1e-9);
    report.p50_ms = percentile(&latencies, 0.50);
    report.p99_ms = percentile(&latencies, 0.99);
    drop(sockets);
    Ok(report)
}
