//! The QUIC path: UDP hole punching, then quinn with the same pinned
//! Ed25519 identities as the TCP path.
//!
//! Pieces, in reading order:
//! - [`socket`]: one UDP socket per daemon, bound to the punch port number,
//!   shared by quinn and punchd's own datagrams (rendezvous probes, punch
//!   datagrams). One socket is one NAT mapping.
//! - [`QuicPath`] (here): the quinn endpoint on that socket, its TLS and
//!   transport settings, and the accept loop that matches each incoming
//!   connection to a peer by the key it authenticated with.
//! - [`probe`]: signed probes that tell the rendezvous our UDP endpoint
//!   and keep that mapping alive.
//! - [`punch`]: one session's UDP hole punch, timed like the TCP one.
//! - [`birthday`]: the punch against a NAT that maps UDP at random.
//!
//! Roles follow the TCP path: the lower key is the QUIC client, the other
//! side only accepts, and only from keys in `[[peers]]`.

pub(crate) mod birthday;
pub(crate) mod congestion;
pub(crate) mod probe;
pub(crate) mod punch;
pub(crate) mod socket;
pub(crate) mod tunnel;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use punch_config::{PublicKeyBytes, QuicCongestion};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::identity::Identity;
use crate::tunnel::tls;
use crate::tunnel::{HANDSHAKE_TIMEOUT, MAX_STREAMS};
use socket::{Demux, PunchSocket};

/// Flow-control window per stream: what one stream may have in flight,
/// so its ceiling is this ÷ RTT (16 MiB: 670 Mbit/s at 200 ms, 3.4 Gbit/s
/// at 40 ms). quinn 0.11 does not auto-tune stream windows; the memory is
/// only held while a reader lags, and the connection window below bounds
/// all streams together. 2 MiB (the old value) capped one stream at
/// 84 Mbit/s at 200 ms RTT.
pub(crate) const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Window for the whole connection: the most a peer can make us buffer,
/// whatever the number of streams. It is also our send window (what quinn
/// queues unacknowledged or unsent), so the most one tunnel buffers each
/// way over QUIC is 32 MiB.
pub(crate) const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// QUIC handshakes in progress at once on the accept side.
const MAX_HANDSHAKES: usize = 16;

/// Why the QUIC path could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// The UDP socket could not be bound or wrapped.
    #[error("cannot bind the UDP punch socket: {0}")]
    Bind(#[from] io::Error),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    /// rustls and quinn disagree (no QUIC-capable cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Crypto(String),
    /// quinn refused to start the connection.
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
}

/// The daemon's QUIC endpoint and UDP punch socket.
#[derive(Debug)]
pub(crate) struct QuicPath {
    endpoint: quinn::Endpoint,
    /// The current socket (replaced by [`QuicPath::rebind_if_idle`]).
    socket: Mutex<Arc<PunchSocket>>,
    pub(crate) demux: Arc<Demux>,
    port: AtomicU16,
    /// Fired after a re-bind: the rendezvous must learn the new mapping.
    rebound: Notify,
    /// QUIC tunnels in service (a re-bind would move them off their
    /// punched mappings).
    live: Arc<AtomicUsize>,
    /// The router maps this port (port mapping): peers reach us through
    /// that mapping, so the port stays put (see [`QuicPath::set_mapped`]).
    mapped: std::sync::atomic::AtomicBool,
    runtime: Arc<dyn quinn::Runtime>,
    transport: Arc<TransportConfig>,
    /// The congestion controller every connection runs (the race keeps
    /// QUIC on long paths only under BBR).
    controller: congestion::Controller,
    identity: Identity,
}

/// The key for QUIC stateless resets, derived from the identity so it
/// survives a restart. A daemon that was killed and restarted has lost its
/// connections; when its old peer's next packet arrives it answers with a
/// stateless reset the peer can verify (the token is an HMAC under this
/// key of the connection id), so the peer drops the dead tunnel at once and
/// punches again, instead of waiting out the keepalive timeout. The TCP
/// path gets the same from the kernel's FIN.
fn reset_key(identity: &Identity) -> Arc<dyn quinn::crypto::HmacKey> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"punchd-quic-stateless-reset-v1:");
    h.update(identity.signing_key().to_bytes());
    Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize()))
}

/// Stream limits as the TCP path's, windows sized for bulk transfers, and
/// the tunnel keepalive doubling as the QUIC keepalive (it also keeps the
/// NAT mappings along the path alive).
fn transport_config(
    keepalive: (Duration, Duration),
    congestion: congestion::Controller,
) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS as u32))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        // Half the tunnel keepalive: cheap PINGs that keep NAT mappings
        // warm and, after a peer restart, draw its stateless reset soon.
        .keep_alive_interval(Some(keepalive.0 / 2))
        .max_idle_timeout(IdleTimeout::try_from(keepalive.0 + keepalive.1).ok())
        // quinn's default (333 ms) delays the first retransmission by ~1 s;
        // the punch has just measured that the path is open.
        .initial_rtt(Duration::from_millis(100));
    if congestion == congestion::Controller::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    t
}

/// The server side's settings: handshakes only from `keys`.
fn server_config(
    identity: &Identity,
    keys: &[PublicKeyBytes],
    transport: &Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls::server_config_any(identity, keys)?)
        .map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport.clone());
    Ok(server)
}

/// The endpoint's settings: stateless resets keyed by the identity.
fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::new(reset_key(identity));
    // Never let a peer clear the fixed bit: a zero first byte is how
    // the socket tells punchd's datagrams from QUIC.
    cfg.grease_quic_bit(false);
    cfg
}

impl QuicPath {
    /// Binds UDP `port` (any free port if it is 0 or taken) and starts the
    /// endpoint, accepting connections from `accept_from` only.
    pub(crate) fn bind(
        port: u16,
        identity: &Identity,
        accept_from: &[PublicKeyBytes],
        keepalive: (Duration, Duration),
        congestion: QuicCongestion,
    ) -> Result<Self, QuicError> {
        let std_socket = match socket::bind(port) {
            Ok(s) => s,
            Err(e) if port != 0 => {
                warn!(port, error = %e, "UDP punch port taken; using any free port for QUIC");
                socket::bind(0)?
            }
            Err(e) => return Err(e.into()),
        };
        let local = std_socket.local_addr()?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let demux = Arc::new(Demux::default());
        let socket = Arc::new(PunchSocket::new(
            runtime.wrap_udp_socket(std_socket)?,
            demux.clone(),
        ));
        let host_tcp = congestion::host_tcp();
        let controller = congestion::choose(congestion, host_tcp.as_deref());
        let transport = Arc::new(transport_config(keepalive, controller));
        let server = server_config(identity, accept_from, &transport)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config(identity),
            Some(server),
            socket.clone(),
            runtime.clone(),
        )?;
        info!(
            port = local.port(),
            ipv6 = local.is_ipv6(),
            congestion = controller.name(),
            setting = ?congestion,
            host_tcp = host_tcp.as_deref().map_or("unreadable", str::trim),
            "QUIC path ready (UDP punch socket bound)"
        );
        Ok(Self {
            endpoint,
            socket: Mutex::new(socket),
            demux,
            port: AtomicU16::new(local.port()),
            rebound: Notify::new(),
            live: Arc::new(AtomicUsize::new(0)),
            mapped: std::sync::atomic::AtomicBool::new(false),
            runtime,
            transport,
            controller,
            identity: identity.clone(),
        })
    }

    /// Whether this path's connections run BBR.
    pub(crate) fn runs_bbr(&self) -> bool {
        self.controller == congestion::Controller::Bbr
    }

    fn current_socket(&self) -> Arc<PunchSocket> {
        self.socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a QUIC tunnel as in service while the guard lives.
    pub(crate) fn live_tunnel(&self) -> LiveTunnel {
        self.live.fetch_add(1, Ordering::Relaxed);
        LiveTunnel(self.live.clone())
    }

    /// Moves the endpoint to a fresh UDP port, unless a QUIC tunnel is in
    /// service (it would lose its punched mapping) or any connection is
    /// still open or closing (its last packets would leave from the new
    /// port, reach the peer's NAT unsolicited and spoil the next punch).
    /// Called after a UDP punch in which neither side heard the other: a
    /// Linux NAT may then hold a conntrack entry for an early datagram that
    /// re-maps our port for this peer for as long as packets keep coming
    /// (lab/README.md, "UDP and conntrack"); a new port is a new mapping,
    /// and the next punch starts clean. `why` is for the log. Returns the
    /// new port.
    pub(crate) fn rebind_if_idle(&self, why: &str) -> Option<u16> {
        if self.live.load(Ordering::Relaxed) > 0 || self.endpoint.open_connections() > 0 {
            return None;
        }
        if self.mapped.load(Ordering::Relaxed) {
            debug!("{why}; QUIC keeps its port: the router maps it for our peers");
            return None;
        }
        let fresh = socket::bind(0)
            .and_then(|s| Ok((s.local_addr()?.port(), self.runtime.wrap_udp_socket(s)?)));
        let (port, inner) = match fresh {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "cannot bind a fresh UDP port; keeping the old one");
                return None;
            }
        };
        let socket = Arc::new(PunchSocket::new(inner, self.demux.clone()));
        if let Err(e) = self.endpoint.rebind_abstract(socket.clone()) {
            warn!(error = %e, "cannot move QUIC to a fresh UDP port");
            return None;
        }
        *self
            .socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = socket;
        let old = self.port.swap(port, Ordering::Relaxed);
        info!(
            old,
            new = port,
            "{why}; moved QUIC to a fresh port for the next punch"
        );
        self.rebound.notify_one();
        Some(port)
    }

    /// Says whether the router maps this UDP port for us (port mapping).
    /// A mapped port is not moved to a fresh one: the mapping is how peers
    /// reach us, and a move would leave it pointing at a closed port. (The
    /// stale conntrack entries a move escapes cannot form on a mapped port:
    /// the router's mapping, re-made on a fresh external port after a
    /// restart, decides where the peer's packets go.)
    pub(crate) fn set_mapped(&self, mapped: bool) {
        self.mapped.store(mapped, Ordering::Relaxed);
    }

    /// After a QUIC tunnel's path died (no keepalive answer, idle timeout).
    /// Whatever killed it (a NAT that rebooted or flushed its conntrack
    /// table, a new uplink) left the old port's mappings suspect: both
    /// sides' last packets to them may have created the clashing entries
    /// described at [`Self::rebind_if_idle`], which would spoil a re-punch
    /// on the same port until they time out (measured in the lab's
    /// `conntrack -F` case: 25 s until a relayed tunnel, 38–43 s until
    /// direct). So once the dead connection has drained (at most 1 s), the
    /// endpoint moves to a fresh port, unless other QUIC tunnels use it.
    ///
    /// Nor does it move when a punch is running or began since the loss:
    /// that punch's order already gave the peer this port, and moving would
    /// leave the peer punching a closed one. That is the side that noticed
    /// the loss last (keepalive timers differ by a few hundred ms, the
    /// drain by up to 1 s) answering the other side's re-punch. CI met it:
    /// the late side moved in the middle of the punch, nothing was heard,
    /// relayed at 10 s and direct only at 32 s. In the lab's flush case
    /// (the bulk flowing from the side that asks), the late answering side
    /// keeping its port while the asking side moved went direct on the
    /// first round in 6 of 6 runs; the asking side keeping its port failed
    /// 4 of 4 (the sender's port is the one its in-flight packets poison),
    /// and then the punch that hears nothing moves both, as it would have
    /// anyway.
    pub(crate) async fn rebind_after_lost_path(&self) {
        if self.live.load(Ordering::Relaxed) > 0 {
            return;
        }
        let begun = self.demux.punches_begun();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        if self.demux.punching() || self.demux.punches_begun() != begun {
            info!(
                port = self.port(),
                "the QUIC path was lost; QUIC keeps its port: a punch since then told the peer this one"
            );
            return;
        }
        self.rebind_if_idle("the QUIC path was lost");
    }

    /// Resolves after the next re-bind.
    pub(crate) async fn rebound(&self) {
        self.rebound.notified().await;
    }

    /// The endpoint handle (status reads its connection count).
    pub(crate) fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Whether the punch socket reaches IPv6 peers too (dual-stack; see
    /// [`socket::bind`]). Without it IPv6 UDP candidates are dropped.
    pub(crate) fn dual_stack(&self) -> bool {
        self.current_socket().dual_stack()
    }

    /// The local UDP port (what the rendezvous is told).
    pub(crate) fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// Sends one of punchd's own datagrams from the punch socket.
    pub(crate) async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.current_socket().send_to(datagram, to).await
    }

    /// Starts a QUIC connection to `to` that accepts only `peer`'s key.
    pub(crate) fn connect(
        &self,
        to: SocketAddr,
        peer: &PublicKeyBytes,
    ) -> Result<quinn::Connecting, QuicError> {
        self.connect_from(&self.endpoint, to, peer)
    }

    /// [`Self::connect`] from another endpoint (see [`Self::endpoint_for`]).
    pub(crate) fn connect_from(
        &self,
        endpoint: &quinn::Endpoint,
        to: SocketAddr,
        peer: &PublicKeyBytes,
    ) -> Result<quinn::Connecting, QuicError> {
        let tls = tls::client_config(&self.identity, peer)?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(self.transport.clone());
        endpoint
            .connect_with(cfg, to, tls::SERVER_NAME)
            .map_err(QuicError::from)
    }

    /// A QUIC endpoint of its own on `socket`, with this path's identity
    /// and transport settings, accepting only `peer`. Birthday probing
    /// finds the peer through one of many sockets (one NAT mapping each);
    /// the tunnel must then run on that very socket, not the punch port.
    /// The endpoint lives as long as its connections (quinn keeps its
    /// driver running while any connection does).
    pub(crate) fn endpoint_for(
        &self,
        socket: std::net::UdpSocket,
        peer: &PublicKeyBytes,
    ) -> Result<quinn::Endpoint, QuicError> {
        let server = server_config(&self.identity, &[*peer], &self.transport)?;
        Ok(quinn::Endpoint::new(
            endpoint_config(&self.identity),
            Some(server),
            socket,
            self.runtime.clone(),
        )?)
    }

    /// Replaces the keys the endpoint accepts handshakes from (a config
    /// reload added or removed peers). Connections already up keep theirs.
    pub(crate) fn accept_from(
        &self,
        identity: &Identity,
        keys: &[PublicKeyBytes],
    ) -> Result<(), QuicError> {
        let server = server_config(identity, keys, &self.transport)?;
        self.endpoint.set_server_config(Some(server));
        Ok(())
    }

    /// Accepts connections until `cancel`, each handshaked (bounded in
    /// number and time) and handed to the peer whose key it presented.
    /// Keys missing from `routes` (peers for which we are the QUIC client)
    /// are closed: only the lower key dials. `routes` is shared with the
    /// daemon, which changes it when a reload adds or removes peers.
    pub(crate) async fn accept_loop(
        self: Arc<Self>,
        routes: QuicRoutes,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
            };
            // Under load, a handshake from an address that has not shown it
            // can receive (a QUIC Retry round trip) gets no slot: a spoofed
            // flood cannot hold the slots for HANDSHAKE_TIMEOUT each.
            if !incoming.remote_address_validated()
                && slots.available_permits() < MAX_HANDSHAKES / 2
            {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                debug!(remote = %incoming.remote_address(), "QUIC handshakes saturated; refusing");
                incoming.refuse();
                continue;
            };
            let routes = routes.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let remote = incoming.remote_address();
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "QUIC handshake failed (not a listed peer, or lost)");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "QUIC handshake timed out");
                        return;
                    }
                };
                let route = {
                    let routes = routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let keys: Vec<_> = routes.keys().copied().collect();
                    peer_key(&conn, &keys).and_then(|k| routes.get(&k).cloned())
                };
                match route {
                    Some(tx) => {
                        if let Err(mpsc::error::TrySendError::Full(c)) = tx.try_send(conn) {
                            c.close(VarInt::from_u32(1), b"busy");
                        }
                    }
                    None => conn.close(VarInt::from_u32(1), b"dial the other way"),
                }
            });
        }
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
    }
}

/// Incoming QUIC connections by the key they authenticated with, to the
/// task of that peer (only peers for which we accept, the higher key).
pub(crate) type QuicRoutes = Arc<Mutex<HashMap<PublicKeyBytes, mpsc::Sender<quinn::Connection>>>>;

/// A QUIC tunnel in service; see [`QuicPath::live_tunnel`].
#[derive(Debug)]
pub(crate) struct LiveTunnel(Arc<AtomicUsize>);

impl Drop for LiveTunnel {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `[[peers]]` key a connection authenticated with.
fn peer_key(conn: &quinn::Connection, keys: &[PublicKeyBytes]) -> Option<PublicKeyBytes> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::presented_key(certs.first()?.as_ref(), keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use punch_rendezvous::datagram;
    use tokio::net::UdpSocket;

    fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
        tokio::time::timeout(Duration::from_secs(2), f)
    }

    #[tokio::test]
    async fn punchd_datagrams_are_taken_off_the_quic_socket_and_routed() {
        let id = Identity::generate().unwrap();
        let path = QuicPath::bind(
            0,
            &id,
            &[],
            (Duration::from_secs(5), Duration::from_secs(10)),
            QuicCongestion::Cubic,
        )
        .unwrap();
        let to = SocketAddr::from(([127, 0, 0, 1], path.port()));
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, stranger_addr) =
            (server.local_addr().unwrap(), stranger.local_addr().unwrap());

        // Punch datagrams reach the session they name, and only that one.
        let (guard, mut heard) = path.demux.session("s1");
        stranger
            .send_to(&datagram::punch("other"), to)
            .await
            .unwrap();
        stranger.send_to(&datagram::punch("s1"), to).await.unwrap();
        assert_eq!(within(heard.recv()).await.unwrap(), Some(stranger_addr));
        assert!(
            heard.try_recv().is_err(),
            "the other session's punch leaked"
        );
        drop(guard);
        stranger.send_to(&datagram::punch("s1"), to).await.unwrap();
        // Unregistered: the route (the channel's only sender) is gone.
        assert_eq!(within(heard.recv()).await.unwrap(), None);

        // Acks count only from the rendezvous they were asked of.
        let mut acks = path.demux.acks_from(server_addr);
        let seen: SocketAddr = "203.0.113.2:40000".parse().unwrap();
        stranger.send_to(&datagram::ack(7, seen), to).await.unwrap();
        server.send_to(&datagram::ack(8, seen), to).await.unwrap();
        assert_eq!(within(acks.recv()).await.unwrap(), Some((8, seen)));

        // And we send from the same socket: the server sees our port.
        path.send_to(&datagram::punch("x"), server_addr)
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = within(server.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(from.port(), path.port());
        assert_eq!(
            datagram::parse(&buf[..n]),
            Some(datagram::Datagram::Punch { session: "x" })
        );

        // A tunnel in service pins the port...
        let live = path.live_tunnel();
        assert_eq!(path.rebind_if_idle("test"), None);
        drop(live);
        // A lost path moves nothing while a punch runs (its order gave the
        // peer this port)...
        let (punch, _) = path.demux.session("s-running");
        let before = path.port();
        path.rebind_after_lost_path().await;
        assert_eq!(path.port(), before, "moved in the middle of a punch");
        drop(punch);
        // ...without one, all of this moves to a fresh port, and the
        // rendezvous client is told.
        let old = path.port();
        let new = path.rebind_if_idle("test").expect("idle endpoint re-binds");
        assert_ne!(new, old);
        assert_eq!(path.port(), new);
        within(path.rebound()).await.expect("re-bind is announced");
        path.send_to(&datagram::punch("y"), server_addr)
            .await
            .unwrap();
        let (_, from) = within(server.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(from.port(), new);
        let (_guard, mut heard) = path.demux.session("s2");
        let to_new = SocketAddr::from(([127, 0, 0, 1], new));
        stranger
            .send_to(&datagram::punch("s2"), to_new)
            .await
            .unwrap();
        assert_eq!(within(heard.recv()).await.unwrap(), Some(stranger_addr));
    }
}
