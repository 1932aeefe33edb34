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
//! format).

pub mod datagram;
pub mod protocol;

#[cfg(feature = "server")]
pub mod server;
