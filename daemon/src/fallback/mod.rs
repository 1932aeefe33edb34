//! The relayed fallback: when no direct path could be punched (and the
//! mode allows it), the same TLS + mux tunnel runs over a WebSocket byte
//! relay through the rendezvous ([`websocket`]). Both sides reach this at
//! the same deadline; the server pairs them by session and sees only
//! ciphertext. This is the only thing "relay" means in the daemon.

pub(crate) mod websocket;

use std::net::SocketAddr;

use punch_config::PublicKeyBytes;
use punch_rendezvous::protocol::PunchOrder;
use std::sync::Arc;

use crate::admin::status::PeerStatus;
use crate::control::link::{Endpoint, LinkError};
use crate::control::url::UrlError;
use crate::identity::Identity;
use crate::path::{Role, Transport};
use crate::tunnel::metered::Metered;
use crate::tunnel::{mux, TunnelError, TunnelParts};

/// Why the relayed path could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FallbackError {
    /// The rendezvous URL is not usable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// TLS to the rendezvous failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Network trouble reaching the relay.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The relay's WebSocket failed (the server refused the session, say).
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The tunnel over the relay did not come up.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The relay did not answer within [`CONNECT_TIMEOUT`] (a blackholed or
    /// overloaded rendezvous): given up, so the peer can punch again.
    #[error("the relay did not connect within {0:?}")]
    Timeout(std::time::Duration),
}

/// The most the relay's TCP connect, TLS and WebSocket upgrade may take
/// together. Without it a blackholed rendezvous leaves a peer "punching"
/// for minutes and blocks re-punching.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Who we are and whom we expect at the other end of the relay.
pub(crate) struct Relayed<'a> {
    pub(crate) rendezvous: &'a Endpoint,
    pub(crate) role: Role,
    pub(crate) identity: &'a Identity,
    pub(crate) peer: &'a PublicKeyBytes,
    pub(crate) status: &'a Arc<PeerStatus>,
}

/// Opens the relay for this session and runs the tunnel handshake over it.
pub(crate) async fn connect(
    r: Relayed<'_>,
    order: &PunchOrder,
) -> Result<(TunnelParts, SocketAddr), FallbackError> {
    // With several rendezvous instances the relay is the one that
    // coordinated the punch, which may not be ours.
    let elsewhere = match order.relay_url.as_deref() {
        Some(url) if url != r.rendezvous.url() => Some(r.rendezvous.sibling(url)?),
        _ => None,
    };
    let relay = elsewhere.as_ref().unwrap_or(r.rendezvous);
    let (io, remote) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        websocket::connect(relay, &order.session, &order.relay_token),
    )
    .await
    .map_err(|_| FallbackError::Timeout(CONNECT_TIMEOUT))??;
    let io = Metered::new(io, r.status.clone());
    let parts = mux::handshake(io, r.role, r.identity, r.peer, Transport::Relay).await?;
    Ok((parts, remote))
}
