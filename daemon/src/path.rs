//! The words every layer shares: which end of a pair plays client
//! ([`Role`]), what kind of path a tunnel takes ([`PathState`]) and what
//! carries it ([`Transport`]). Kept apart and at the bottom so the punch
//! engine, the tunnel, the race and the status model all import them from
//! one place, never from each other.

use serde::{Deserialize, Serialize};

/// Which end plays TLS client and mux client: the lower public key, so both
/// ends agree without a handshake of their own. Equal keys mean we punched
/// ourselves, which is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// TLS client, yamux client.
    Client,
    /// TLS server, yamux server.
    Server,
}

impl Role {
    /// Our role against `peer`; `None` for a self-connect.
    pub(crate) fn choose(own: &[u8; 32], peer: &[u8; 32]) -> Option<Self> {
        match own.cmp(peer) {
            std::cmp::Ordering::Less => Some(Role::Client),
            std::cmp::Ordering::Greater => Some(Role::Server),
            std::cmp::Ordering::Equal => None,
        }
    }
}

/// The path a peer's tunnel takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathState {
    /// A punched, direct connection.
    Direct,
    /// Through the rendezvous relay.
    Relayed,
    /// No tunnel.
    #[default]
    None,
}

impl PathState {
    /// The name used in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Direct => "direct",
            PathState::Relayed => "relayed",
            PathState::None => "none",
        }
    }
}

/// The transport under the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Punched TCP.
    Tcp,
    /// Punched QUIC.
    Quic,
    /// The rendezvous relay.
    Relay,
}

impl Transport {
    /// The name used in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Relay => "relay",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_key_is_client_and_self_is_refused() {
        assert_eq!(Role::choose(&[1; 32], &[2; 32]), Some(Role::Client));
        assert_eq!(Role::choose(&[2; 32], &[1; 32]), Some(Role::Server));
        assert_eq!(Role::choose(&[2; 32], &[2; 32]), None);
    }
}
