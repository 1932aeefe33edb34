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
//! The signature in `hello` covers [`HELLO_CONTEXT`], the raw nonce, the
//! name, the public key and the SHA-256 of the token (see
//! [`sign_challenge`]): a hello cannot be replayed on another connection,
//! nor re-sent under another name or token, nor mistaken for a signature
//! from some other protocol.
//!
//! The server signs every punch order with its own Ed25519 key
//! ([`sign_order`]), binding it to the recipient's name and registration
//! nonce, so a daemon that pins the server's key (`[rendezvous]
//! server_key`) can tell an order from the server from one a proxy or the
//! network made up or rewrote, or one meant for another daemon
//! ([`verify_order`]).

use std::net::SocketAddr;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Protocol version spoken by this build. A daemon with another version is
/// refused with [`ErrorCode::VersionMismatch`].
///
/// 2: the hello signature binds name, key and token; orders are signed.
pub const PROTOCOL_VERSION: u32 = 2;

/// Domain separation for the hello signature.
pub const HELLO_CONTEXT: &[u8] = b"punchd-rendezvous-hello-v2:";

/// Domain separation for the server's punch-order signature.
pub const ORDER_CONTEXT: &[u8] = b"punchd-rendezvous-order-v1:";

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
        /// The server's order-signing public key (base64): what a daemon
        /// can pin as `[rendezvous] server_key`. Only informative here
        /// (whoever forges the welcome can forge this too).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_key: Option<String>,
        /// This server takes observe-only hellos ([`Hello::observe_only`]):
        /// a daemon shows it its endpoint in the other address family only
        /// when this is set, because a server from before them reads such
        /// a hello as a registration that replaces the daemon's own.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        observe_only: bool,
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
    /// Where to join the relay when it is not the rendezvous this order
    /// came from: the `public_url` of the instance that coordinated the
    /// punch (several instances sharing Redis). Absent: the daemon's own
    /// rendezvous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_url: Option<String>,
    /// How to meet, from both sides' NAT discovery ([`crate::nat::choose`]).
    /// Absent: today's timed punch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<crate::nat::Strategy>,
    /// The server's signature over the order and its recipient
    /// ([`sign_order`]), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
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

/// The hello body. Its `Debug` masks the token, so a logged message
/// never carries it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
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
    /// The punch port as the daemon's router mapped it for TCP (UPnP IGD,
    /// NAT-PMP or PCP): reachable from anywhere, even where the NAT
    /// randomizes ports. The port may differ from the punch port (the
    /// router picks). Kept only on the IP the server observes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_tcp: Option<SocketAddr>,
    /// The UDP (QUIC) port as the router mapped it; see `mapped_tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_udp: Option<SocketAddr>,
    /// How the daemon's NAT maps TCP and UDP (NAT discovery), when it has
    /// measured it: the server picks each pair's punch strategy from both
    /// sides' ([`crate::nat::choose`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<crate::nat::NatSummary>,
    /// The round trip the daemon measured connecting to this server (its
    /// TCP handshake), microseconds. The server times punches by both
    /// daemons' RTTs, and a daemon's pings report one only from its second
    /// ping on: an order in between was timed as if the daemon were next
    /// to the server, and a far daemon fired late (a first punch at 150 ms
    /// RTT with one side 38 ms late, which also gave that side's TCP a
    /// minimum RTT of a quarter of the path's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    /// Network token, when the server requires one.
    #[serde(default)]
    pub token: Option<String>,
    /// Base64 signature by `public_key` (see [`sign_challenge`]).
    pub signature: String,
    /// Not a registration: this connection only shows the server the
    /// daemon's endpoint in its *other* address family (IPv6 beside an
    /// IPv4 registration, or the reverse), from its punch port. The server
    /// records it on the registration, answers with a welcome whose
    /// `observed_addr` is that endpoint, and closes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub observe_only: bool,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("local_addrs", &self.local_addrs)
            .field("udp_port", &self.udp_port)
            .field("mapped_tcp", &self.mapped_tcp)
            .field("mapped_udp", &self.mapped_udp)
            .field("nat", &self.nat)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("signature", &self.signature)
            .field("observe_only", &self.observe_only)
            .finish()
    }
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

/// Appends a length-prefixed field, so no two field lists sign the same
/// bytes (`"ab" + "c"` vs `"a" + "bc"`).
fn field(msg: &mut Vec<u8>, bytes: &[u8]) {
    msg.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    msg.extend_from_slice(bytes);
}

/// SHA-256 of the token, or empty: the hello binds the token without the
/// signature being an oracle for it.
fn token_hash(token: Option<&str>) -> Vec<u8> {
    token.map_or_else(Vec::new, |t| Sha256::digest(t.as_bytes()).to_vec())
}

fn hello_message(nonce: &[u8], name: &str, public_key: &[u8], token: Option<&str>) -> Vec<u8> {
    let mut msg = HELLO_CONTEXT.to_vec();
    field(&mut msg, nonce);
    field(&mut msg, name.as_bytes());
    field(&mut msg, public_key);
    field(&mut msg, &token_hash(token));
    msg
}

/// Signs a hello: the challenge nonce, the name to register, this key and
/// the token hash, so none of them can be swapped under the signature.
pub fn sign_challenge(key: &SigningKey, nonce: &[u8], name: &str, token: Option<&str>) -> String {
    let msg = hello_message(nonce, name, key.verifying_key().as_bytes(), token);
    b64(&key.sign(&msg).to_bytes())
}

/// Checks a hello signature against the nonce the server sent and the
/// name and token the hello carries.
pub fn verify_challenge(
    public_key: &VerifyingKey,
    nonce: &[u8],
    name: &str,
    token: Option<&str>,
    signature_b64: &str,
) -> Result<(), WireError> {
    let sig = unb64::<64>(signature_b64, "signature")?;
    let msg = hello_message(nonce, name, public_key.as_bytes(), token);
    public_key
        .verify(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| WireError::BadSignature)
}

/// What an order signature covers: every field but the signature, plus
/// the recipient's name and registration nonce, so an order cannot be
/// rewritten, nor replayed to another daemon or a later registration.
fn order_message(recipient: &str, nonce: &[u8], order: &PunchOrder) -> Vec<u8> {
    let mut msg = ORDER_CONTEXT.to_vec();
    field(&mut msg, recipient.as_bytes());
    field(&mut msg, nonce);
    field(&mut msg, order.session.as_bytes());
    field(&mut msg, order.peer.as_bytes());
    field(&mut msg, order.public_key.as_bytes());
    for list in [&order.candidates, &order.udp_candidates] {
        msg.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for addr in list {
            field(&mut msg, addr.to_string().as_bytes());
        }
    }
    msg.extend_from_slice(&order.at_us.to_be_bytes());
    msg.push(u8::from(order.initiator));
    field(&mut msg, order.relay_token.as_bytes());
    // Only when present, so orders without it verify as before.
    if let Some(url) = &order.relay_url {
        field(&mut msg, url.as_bytes());
    }
    if let Some(strategy) = &order.strategy {
        let json = serde_json::to_string(strategy).unwrap_or_default();
        field(&mut msg, json.as_bytes());
    }
    msg
}

/// Signs `order` for `recipient` (registered with challenge `nonce`).
pub fn sign_order(key: &SigningKey, recipient: &str, nonce: &[u8], order: &mut PunchOrder) {
    let sig = key.sign(&order_message(recipient, nonce, order));
    order.signature = Some(b64(&sig.to_bytes()));
}

/// Why an order was not accepted as the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// No signature at all.
    #[error("the punch order is unsigned")]
    Unsigned,
    /// A signature that does not verify with the pinned key for us.
    #[error("the punch order's signature does not verify with the pinned server_key")]
    BadSignature,
}

/// Checks that `order` was signed by `server_key` for `recipient` on the
/// registration with challenge `nonce`.
pub fn verify_order(
    server_key: &VerifyingKey,
    recipient: &str,
    nonce: &[u8],
    order: &PunchOrder,
) -> Result<(), OrderError> {
    let sig = order.signature.as_deref().ok_or(OrderError::Unsigned)?;
    let sig = unb64::<64>(sig, "signature").map_err(|_| OrderError::BadSignature)?;
    server_key
        .verify(
            &order_message(recipient, nonce, order),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| OrderError::BadSignature)
}

/// Microseconds since the Unix epoch on this host's clock.
pub fn unix_time_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// IPv6 prefix length of one link (one LAN): a host's stable and
/// temporary addresses share it, and no other network's hosts are in it.
pub const LINK_PREFIX_V6: u32 = 64;

/// IPv6 prefix length of one site: RFC 6177 gives a site a /48 to /56,
/// and /48 is the one every subnet of one site shares.
pub const SITE_PREFIX_V6: u32 = 48;

/// Whether two addresses are in one network at the given IPv6 prefix
/// length: the same IPv4 address (for IPv4 the public address behind
/// which a NAT hides its LAN is the whole network), or IPv6 addresses
/// sharing their first `v6_len` bits. Mixed families never are.
fn same_network(a: std::net::IpAddr, b: std::net::IpAddr, v6_len: u32) -> bool {
    use std::net::IpAddr;
    let prefix = |ip: std::net::Ipv6Addr| u128::from(ip) & (u128::MAX << (128 - v6_len));
    match (a.to_canonical(), b.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a == b,
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix(a) == prefix(b),
        _ => false,
    }
}

/// Whether `a` and `b` are on one link: the same IPv4 address, or one
/// IPv6 /64 ([`LINK_PREFIX_V6`]). An address a daemon reports for itself
/// is vouched for by an observation on its link (the server passes it on,
/// the peer accepts it): it is that host's, or its neighbour's.
pub fn same_link(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    same_network(a, b, LINK_PREFIX_V6)
}

/// Whether two daemons seen at these public IPs share a site: the same
/// IPv4 address (one NAT), or one IPv6 /48 ([`SITE_PREFIX_V6`]). Only then
/// may a punch order carry a peer's LAN addresses (private IPv4,
/// unique-local IPv6), and only then does a daemon contact them: elsewhere
/// they could only lead into the recipient's own LAN or to a third host.
/// The server decides with it what to offer and the daemon what to
/// accept, so the two never disagree.
pub fn same_site(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    same_network(a, b, SITE_PREFIX_V6)
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
    fn hello_signatures_bind_key_nonce_name_and_token() {
        let k = key(1);
        let vk = k.verifying_key();
        let nonce = [9u8; NONCE_LEN];
        let sig = sign_challenge(&k, &nonce, "alice", Some("s3cret"));
        assert!(verify_challenge(&vk, &nonce, "alice", Some("s3cret"), &sig).is_ok());
        let bad = Err(WireError::BadSignature);
        assert_eq!(
            verify_challenge(&vk, &[8u8; NONCE_LEN], "alice", Some("s3cret"), &sig),
            bad
        );
        assert_eq!(
            verify_challenge(
                &key(2).verifying_key(),
                &nonce,
                "alice",
                Some("s3cret"),
                &sig
            ),
            bad
        );
        assert_eq!(
            verify_challenge(&vk, &nonce, "mallory", Some("s3cret"), &sig),
            bad
        );
        assert_eq!(
            verify_challenge(&vk, &nonce, "alice", Some("other"), &sig),
            bad
        );
        assert_eq!(verify_challenge(&vk, &nonce, "alice", None, &sig), bad);
        assert!(verify_challenge(&vk, &nonce, "alice", None, "!!").is_err());
    }

    fn order() -> PunchOrder {
        PunchOrder {
            session: "s1".into(),
            peer: "bob".into(),
            public_key: b64(key(2).verifying_key().as_bytes()),
            candidates: vec!["203.0.113.3:40000".parse().unwrap()],
            udp_candidates: vec!["203.0.113.3:40001".parse().unwrap()],
            at_us: 1_000,
            initiator: true,
            relay_token: "r".into(),
            relay_url: None,
            strategy: None,
            signature: None,
        }
    }

    #[test]
    fn orders_verify_only_unchanged_for_their_recipient_and_registration() {
        let server = key(7);
        let vk = server.verifying_key();
        let nonce = [3u8; NONCE_LEN];
        let mut o = order();
        assert_eq!(
            verify_order(&vk, "alice", &nonce, &o),
            Err(OrderError::Unsigned)
        );
        sign_order(&server, "alice", &nonce, &mut o);
        assert_eq!(verify_order(&vk, "alice", &nonce, &o), Ok(()));
        let bad = Err(OrderError::BadSignature);
        assert_eq!(
            verify_order(&vk, "carol", &nonce, &o),
            bad,
            "another daemon"
        );
        assert_eq!(
            verify_order(&vk, "alice", &[4u8; NONCE_LEN], &o),
            bad,
            "another registration"
        );
        assert_eq!(
            verify_order(&key(8).verifying_key(), "alice", &nonce, &o),
            bad
        );
        let tampered: [fn(&mut PunchOrder); 9] = [
            |o| o.relay_url = Some("http://203.0.113.66:8080".into()),
            |o| {
                o.strategy = Some(crate::nat::Strategy::RelayFirst {
                    reason: crate::nat::RelayReason::BothUnpredictable,
                })
            },
            |o| o.candidates[0] = "192.0.2.99:22".parse().unwrap(),
            |o| o.udp_candidates.push("192.0.2.99:53".parse().unwrap()),
            |o| o.at_us += 1,
            |o| o.peer = "mallory".into(),
            |o| o.public_key = b64(key(9).verifying_key().as_bytes()),
            |o| o.session = "s2".into(),
            |o| o.initiator = false,
        ];
        for change in tampered {
            let mut t = o.clone();
            change(&mut t);
            assert_eq!(verify_order(&vk, "alice", &nonce, &t), bad, "{t:?}");
        }
        // Moving a candidate between the lists changes the signed bytes too.
        let mut moved = o.clone();
        let c = moved.candidates.remove(0);
        moved.udp_candidates.insert(0, c);
        assert_eq!(verify_order(&vk, "alice", &nonce, &moved), bad);
    }

    #[test]
    fn observe_only_is_off_the_wire_unless_used_and_off_by_default() {
        // A welcome from a server before observe-only hellos: not offered.
        let old = r#"{"type":"welcome","observed_addr":"203.0.113.2:1","server_time_us":1}"#;
        let Ok(ServerMsg::Welcome { observe_only, .. }) = serde_json::from_str(old) else {
            panic!("an older welcome parses")
        };
        assert!(!observe_only);
        // A plain hello is the same bytes as before.
        let h = ClientMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            name: "alice".into(),
            public_key: String::new(),
            local_addrs: vec![],
            udp_port: None,
            mapped_tcp: None,
            mapped_udp: None,
            token: None,
            signature: String::new(),
            nat: None,
            rtt_us: None,
            observe_only: false,
        });
        assert!(!serde_json::to_string(&h).unwrap().contains("observe_only"));
    }

    #[test]
    fn a_hello_never_prints_its_token() {
        let h = ClientMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            name: "alice".into(),
            public_key: String::new(),
            local_addrs: vec![],
            udp_port: None,
            mapped_tcp: None,
            mapped_udp: None,
            nat: None,
            rtt_us: None,
            token: Some("hunter2".into()),
            signature: String::new(),
            observe_only: false,
        });
        let shown = format!("{h:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
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
