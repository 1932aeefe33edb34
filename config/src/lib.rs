//! Configuration for punchd: the `peer.toml` a daemon reads and the
//! `rendezvous.toml` the rendezvous server reads.
//!
//! Start with [`PeerConfig::load`] and [`RendezvousConfig::load`]. Both parse
//! with serde (`deny_unknown_fields`, so a typo is an error rather than a
//! silently ignored key), then run a validation pass for the rules serde
//! cannot express (unique names, references between sections, address
//! syntax). Every error is a [`ConfigError`] that names the file, the line and
//! column, and the dotted key, and says what to do about it.
//!
//! Module map:
//! - [`peer`]: the daemon's schema and its cross-section checks.
//! - [`ports`]: `host:first-last` port ranges on forwards and exposes.
//! - [`rendezvous`]: the server's schema and its limits.
//! - [`error`]: the located error type and the span lookup behind it.
//! - [`types`]: small value types shared by both (secrets, names, keys).

pub mod error;
pub mod peer;
pub mod ports;
pub mod rendezvous;
pub mod types;

pub use error::ConfigError;
pub use peer::{
    AdminSection, Expose, Forward, PeerConfig, PeerEntry, Protocol, PunchMode, PunchSection,
    QuicCongestion, TransportKind,
};
pub use ports::{PortRange, MAX_RANGE_PORTS};
pub use rendezvous::{RendezvousConfig, ServerLimits, TlsSection};
pub use types::{PeerName, PublicKeyBytes, Secret};
