//! punch-rendezvous: where punchd daemons meet.
//!
//! Start with [`protocol`]: the messages daemons and server exchange. That
//! module has no server dependencies, so the daemon builds against this crate
//! with `default-features = false`.
//!
//! With the `server` feature (default), [`server`] is the axum application:
//! `server::run` serves `/v1/ws` (registration and punch coordination),
//! `/v1/relay/{session}` (the encrypted fallback relay), `/healthz` and
//! `/metrics` until its cancellation token fires, plus a UDP observation
//! endpoint on the same port for the QUIC path ([`datagram`] is its wire
//! format), and NAT discovery's second endpoint (`observe_port`, TCP and
//! UDP, `server/observe.rs`); [`nat`] holds what daemons report of their
//! NATs and the punch strategy a pair gets.
//!
//! Where to start reading:
//! 1. [`protocol`] — what a daemon and the server say to each other;
//! 2. `server/mod.rs` — the tasks and what flows between them, and `run`;
//! 3. `server/store/` — the rules, as data-only operations behind the
//!    `Store` trait (registration, punch sessions and their orders, results,
//!    relay pairing); `store/memory.rs` is the default, in-memory store and
//!    its unit tests are the clearest statement of the rules;
//! 4. `server/connection.rs` — one daemon's WebSocket around those rules,
//!    with `server/local.rs` delivering what they decide to the right
//!    connection; then `server/relay.rs` and `server/udp.rs`;
//! 5. `server/trust.rs` — the server's order-signing key (`key_file`) and
//!    its own TLS (`[tls]`), the handshake off the accept loop;
//! 6. `server/lan.rs` and `server/ipv6.rs` — which self-reported addresses
//!    become candidates (IPv6: a global one only in an observed /64, a
//!    unique-local one only within a site); `server/bind.rs` — one v6-only
//!    or IPv4 socket per `listen` address.

pub mod datagram;
pub mod nat;
pub mod protocol;

#[cfg(feature = "server")]
pub mod server;
