//! punchd: a peer-to-peer NAT hole-punching daemon that relays local TCP
//! ports between hosts over direct, mutually authenticated tunnels.
//!
//! Where to start reading:
//! 1. [`daemon`]: how the pieces are wired, with a picture of the tasks.
//! 2. [`punch`] and [`punch::plan`]: the timed TCP simultaneous open; the
//!    plan is sans-IO and carries the reasoning about early SYNs and RSTs;
//!    `punch/stream.rs` is how a punched connection closes so the NATs let
//!    the next punch reuse its ports.
//! 3. [`peer`]: one task per peer, owning its tunnel through punch, use
//!    and loss.
//! 4. [`tunnel`] and [`tls`]: TLS 1.3 with pinned Ed25519 raw public keys,
//!    yamux on top.
//! 5. [`quic`]: the second direct path (UDP hole punch, quinn), and
//!    [`race`]: how both paths are raced and one is agreed on.
//! 6. [`relay`]: forwards, exposed services and the per-stream header.
//!
//! Supporting modules: [`identity`] (keys), [`rendezvous_client`] (the
//! WebSocket from the punch port), [`clock`] (server time → local instant),
//! [`status`] and [`admin`] (what `punchd status` shows), [`loopback`] and
//! [`demo`] (everything on 127.0.0.1, for `punchd demo` and tests).

pub mod admin;
pub mod backoff;
pub mod clock;
pub mod daemon;
pub mod demo;
pub mod identity;
pub mod loopback;
pub mod metered;
pub mod peer;
pub mod punch;
pub mod quic;
pub mod race;
pub mod relay;
pub mod relay_transport;
pub mod rendezvous_client;
pub mod status;
pub mod status_client;
pub mod tls;
pub mod tunnel;

pub use daemon::{start, DaemonError, RunningDaemon};
pub use identity::{Identity, IdentityError};
