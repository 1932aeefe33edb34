//! The rendezvous wire protocol: JSON text messages over one WebSocket per
//! daemon, tagged by `type`.
//!
//! ```text
//! server → challenge {version, nonce}
//! daemon → hello {version, name, public_key, local_addrs, udp_port, token, signature}
//! server → welcome {observed_addr, server_time_us, udp_port}
//! daemon ⇄ ping {id, rtt_us} / pong {id, server_time_us}   (RTT, clock offset)
//! daemon → connect {peer}
//! server → punch {session, peer, public_key, candidates, udp_candidates, at_us, ...} (to both)
//! daemon → result {session, path, elapsed_ms, attempts, reason}
//! server → error {code, message}
//! ```
//!
//! The signature in `hello` covers [`HELLO_CONTEXT`] followed by the raw
//! nonce bytes, so a signature cannot be replayed on another server
//! connection or mistaken for a signature from some other protocol.

use std::net::SocketAddr;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build. A daemon with another version is
/// refused with [`ErrorCode::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Domain separation for the hello signature.
pub const HELLO_CONTEXT: &[u8] = b"punchd-rendezvous-hello-v1:";

/// Length of the challenge nonce in bytes.
pub const NONCE_LEN: usize = 32;

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message on every connection.
    Challenge {
        /// Server protocol version.
        version: u32,
        /// Base64 nonce the daemon must sign.
        nonce: String,
    },
    /// Registration accepted.
    Welcome {
        /// The address this connection came from, as the server saw it: the
        /// daemon's public endpoint if it is behind a NAT.
        observed_addr: SocketAddr,
        /// Server clock, microseconds since the Unix epoch.
        server_time_us: u64,
        /// The server's UDP observation port (same host as the WebSocket),
        /// when it runs one: where to send [`crate::datagram`] probes so
        /// peers learn this daemon's UDP endpoint for the QUIC path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        udp_port: Option<u16>,
    },
    /// Answer to [`ClientMsg::Ping`].
    Pong {
        /// Echo of the ping id.
        id: u64,
        /// Server clock when the ping was handled.
        server_time_us: u64,
    },
    /// Punch now (at `at_us`) towards this peer.
    Punch(PunchOrder),
    /// The other side of a fresh session disconnected before it could
    /// punch (its order may never have arrived): stop waiting for it.
    PunchAborted {
        /// The session.
        session: String,
        /// The peer that went away.
        peer: String,
    },

    /// Something was refused; `code` says what.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable explanation with what to do.
        message: String,
    },
}

/// Instructions for one side of a punch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PunchOrder {
    /// Random session id shared by both sides (and the relay, if used).
    pub session: String,
    /// The other daemon's name.
    pub peer: String,
    /// The other daemon's Ed25519 public key (base64): what TLS must see.
    pub public_key: String,
    /// Where to connect: the peer's observed public endpoint first, then the
    /// local addresses it reported (same-LAN and hairpin cases).
    pub candidates: Vec<SocketAddr>,
    /// The peer's UDP endpoints for the QUIC path, in the same order
    /// (observed first, then local); empty when the peer has none.
    #[serde(default)]
    pub udp_candidates: Vec<SocketAddr>,
    /// When both sides fire their first SYN, in server-clock microseconds.
    pub at_us: u64,
    /// True for the side that asked (`connect`).
    pub initiator: bool,
    /// Capability for `GET /v1/relay/{session}`, distinct per side.
    pub relay_token: String,
}

/// Messages a daemon sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Signed registration, answering the challenge.
    Hello(Hello),
    /// Clock and RTT probe; `rtt_us` reports the last RTT measured so the
    /// server can time punches for this daemon's distance.
    Ping {
        /// Echoed in the pong.
        id: u64,
        /// Last round-trip time the daemon measured, if any.
        #[serde(default)]
        rtt_us: Option<u64>,
    },
    /// Ask for a punch with the named peer.
    Connect {
        /// Peer name.
        peer: String,
    },
    /// Outcome of a punch session.
    Result(PunchResult),
}

/// The hello body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Daemon protocol version.
    pub version: u32,
    /// Name to register.
    pub name: String,
    /// Base64 Ed25519 public key.
    pub public_key: String,
    /// Addresses of this host for same-LAN peers.
    #[serde(default)]
    pub local_addrs: Vec<SocketAddr>,
    /// The local UDP punch port, when the daemon offers the QUIC path
    /// (local UDP candidates are `local_addrs` with this port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u16>,
    /// Network token, when the server requires one.
    #[serde(default)]
    pub token: Option<String>,
    /// Base64 signature of `HELLO_CONTEXT || nonce`.
    pub signature: String,
}

/// Which path a session ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// A punched direct connection.
    Direct,
    /// Through the rendezvous relay.
    Relayed,
    /// Nothing worked.
    None,
}

/// What a daemon reports after a punch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PunchResult {
    /// Session id from the order.
    pub session: String,
    /// Resulting path.
    pub path: PathKind,
    /// Time from the order to the tunnel being ready.
    pub elapsed_ms: u64,
    /// Connect attempts made.
    #[serde(default)]
    pub attempts: u32,
    /// Why it failed, when it did.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Machine-readable refusal reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Missing or wrong network token.
    BadToken,
    /// Hello signature does not verify with the given key.
    BadSignature,
    /// The name is registered with another key.
    NameTaken,
    /// Protocol versions differ.
    VersionMismatch,
    /// The asked-for peer is not registered.
    UnknownPeer,
    /// A daemon asked to punch itself.
    SelfConnect,
    /// Too many messages.
    RateLimited,
    /// A message that is not valid JSON of this protocol, or too large.
    Malformed,
    /// The server is full.
    TooManyClients,
    /// Too many punches in flight.
    Busy,
    /// A message that needs registration came before a hello.
    NotRegistered,
    /// The same name and key registered again elsewhere.
    Replaced,
    /// The server is shutting down.
    ShuttingDown,
    /// No hello, or no message at all, in time.
    Timeout,
    /// The relay refused the request.
    RelayRefused,
}

impl ErrorCode {
    /// Every code, for metrics labels.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadToken,
        ErrorCode::BadSignature,
        ErrorCode::NameTaken,
        ErrorCode::VersionMismatch,
        ErrorCode::UnknownPeer,
        ErrorCode::SelfConnect,
        ErrorCode::RateLimited,
        ErrorCode::Malformed,
        ErrorCode::TooManyClients,
        ErrorCode::Busy,
        ErrorCode::NotRegistered,
        ErrorCode::Replaced,
        ErrorCode::ShuttingDown,
        ErrorCode::Timeout,
        ErrorCode::RelayRefused,
    ];

    /// The snake_case name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadToken => "bad_token",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::SelfConnect => "self_connect",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooManyClients => "too_many_clients",
            ErrorCode::Busy => "busy",
            ErrorCode::NotRegistered => "not_registered",
            ErrorCode::Replaced => "replaced",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RelayRefused => "relay_refused",
        }
    }

    /// Whether a daemon should stop retrying (its configuration is wrong)
    /// rather than reconnect with backoff.
    pub fn is_fatal_for_registration(self) -> bool {
        matches!(
            self,
            ErrorCode::BadToken
                | ErrorCode::BadSignature
                | ErrorCode::NameTaken
                | ErrorCode::VersionMismatch
        )
    }
}

/// Errors decoding keys and signatures from their base64 wire form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Not base64.
    #[error("{what} is not valid base64")]
    Base64 {
        /// Which field.
        what: &'static str,
    },
    /// Wrong length or not a valid point/signature.
    #[error("{what} is not a valid Ed25519 value")]
    Invalid {
        /// Which field.
        what: &'static str,
    },
    /// The signature does not match.
    #[error("signature does not verify")]
    BadSignature,
}

/// Standard base64 encoding, as used for every binary field.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], WireError> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| WireError::Base64 { what })?;
    v.try_into().map_err(|_| WireError::Invalid { what })
}

/// Decodes a base64 Ed25519 public key.
pub fn decode_public_key(s: &str) -> Result<VerifyingKey, WireError> {
    let bytes = unb64::<32>(s, "public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| WireError::Invalid { what: "public key" })
}

/// Decodes a base64 nonce.
pub fn decode_nonce(s: &str) -> Result<[u8; NONCE_LEN], WireError> {
    unb64::<NONCE_LEN>(s, "nonce")
}

fn hello_message(nonce: &[u8]) -> Vec<u8> {
    let mut msg = HELLO_CONTEXT.to_vec();
    msg.extend_from_slice(nonce);
    msg
}

/// Signs a challenge nonce for the hello.
pub fn sign_challenge(key: &SigningKey, nonce: &[u8]) -> String {
    b64(&key.sign(&hello_message(nonce)).to_bytes())
}

/// Checks a hello signature against the nonce the server sent.
pub fn verify_challenge(
    public_key: &VerifyingKey,
    nonce: &[u8],
    signature_b64: &str,
) -> Result<(), WireError> {
    let sig = unb64::<64>(signature_b64, "signature")?;
    public_key
        .verify(&hello_message(nonce), &Signature::from_bytes(&sig))
        .map_err(|_| WireError::BadSignature)
}

/// Microseconds since the Unix epoch on this host's clock.
pub fn unix_time_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn messages_are_tagged_snake_case_json() {
        let m = ClientMsg::Connect { peer: "bob".into() };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"connect","peer":"bob"}"#
        );
        let e = ServerMsg::Error {
            code: ErrorCode::UnknownPeer,
            message: "x".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains(r#""code":"unknown_peer""#), "{s}");
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), e);
    }

    #[test]
    fn signatures_bind_key_and_nonce() {
        let k = key(1);
        let nonce = [9u8; NONCE_LEN];
        let sig = sign_challenge(&k, &nonce);
        assert!(verify_challenge(&k.verifying_key(), &nonce, &sig).is_ok());
        assert_eq!(
            verify_challenge(&k.verifying_key(), &[8u8; NONCE_LEN], &sig),
            Err(WireError::BadSignature)
        );
        assert_eq!(
            verify_challenge(&key(2).verifying_key(), &nonce, &sig),
            Err(WireError::BadSignature)
        );
        assert!(verify_challenge(&k.verifying_key(), &nonce, "!!").is_err());
    }

    #[test]
    fn error_code_names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn public_keys_decode_or_explain() {
        let k = key(3).verifying_key();
        assert_eq!(decode_public_key(&b64(k.as_bytes())).unwrap(), k);
        assert_eq!(
            decode_public_key(&b64(&[1, 2, 3])),
            Err(WireError::Invalid { what: "public key" })
        );
    }
}
