//! punchd: a peer-to-peer NAT hole-punching daemon that forwards local TCP
//! ports between hosts over direct, mutually authenticated tunnels.
//!
//! # Map
//!
//! Imports run one way, top to bottom (`tests/layering.rs` checks it):
//!
//! | module | concern |
//! |---|---|
//! | [`daemon`] | wiring: binds listeners, starts one task per concern, routes events, applies reloads |
//! | `reload` | what a config reload changes (sans-IO: old config, new config → plan) |
//! | [`peer`] | one task per peer: a sans-IO state machine (`peer/state.rs`) and its shell |
//! | [`race`] | path selection: TCP and QUIC raced, one kept (`race/select.rs`, sans-IO) |
//! | [`fallback`] | the relayed path through the rendezvous, the only "relay" |
//! | [`control`] | the control plane: rendezvous client, punch jobs (signature-checked against a pinned server key), clock sync, URL, the plain/TLS link |
//! | [`forward`] | port forwarding: local listeners, exposed services and their ACL |
//! | [`quic`] | the QUIC direct path: UDP socket, hole punch, quinn, its tunnel driver |
//! | [`tunnel`] | TLS, yamux, stream header, keepalive, metering; what every path yields |
//! | [`punch`] | the TCP direct path: timed simultaneous open (`punch/plan.rs`, sans-IO); address families (`punch/family.rs`: IPv6 addresses to offer, the happy-eyeballs head start); tunnel sockets' buffer sizes (`punch/buffers.rs`, also for QUIC's UDP socket) |
//! | [`admin`] | HTTP admin API (token and Host check in `admin/auth.rs`), status model, `/metrics`, the `punchd status`/`repunch` client |
//! | [`path`] | shared words: `Role`, `PathState`, `Transport` |
//! | [`nat`] | NAT discovery's verdict: classification of observed mappings (`nat/classify.rs`, sans-IO), the `netcheck`/status document; the probing is `control/netcheck.rs` |
//! | [`identity`], `backoff`, [`testdata`] | keys; retry spacing; test bytes |
//! | `demo` | `punchd demo` and loopback helpers (feature `demo`: embeds the server) |
//!
//! # One forwarded connection
//!
//! 1. `forward/listen.rs`: `run_forward` accepts on `127.0.0.1:2222` and
//!    asks the peer's handle for a stream (`StreamSource::open_stream`).
//! 2. `peer/mod.rs`: the peer task gets `PeerCmd::Open`; `peer/state.rs`
//!    decides: open on the tunnel now, or wait (bounded) while the
//!    initiator asks `control/` for a punch. The punch order comes back as
//!    a `control::PunchJob`, `peer/session.rs` runs `race::punch_direct`
//!    (`punch/` and `quic/` at once, `race/select.rs` keeps one) or, failing
//!    that, `fallback::connect`.
//! 3. `tunnel/mux.rs` (TLS from `tunnel/tls.rs`, then yamux) or
//!    `quic/tunnel.rs` turns the kept connection into a `tunnel::Tunnel`;
//!    `Tunnel::open` gives a `StreamIo`.
//! 4. `tunnel/header.rs`: the opener writes the service name
//!    (`request_service`); on the other host the peer task hands each
//!    inbound stream to `forward/expose.rs`.
//! 5. `forward/expose.rs`: `serve_inbound` reads the header
//!    (`read_request`), checks the `[[expose]]` table and its `allow` list,
//!    connects to the `target`, answers (`reply`), and `forward/splice.rs`
//!    copies bytes both ways, framed with an end-of-data marker
//!    (`forward/frame.rs`), until each side half-closes; a stream cut
//!    before its marker resets both local sockets (never a FIN).
//!
//! Keepalive (`tunnel/keepalive.rs`) runs on a reserved stream of the same
//! tunnel; status (`admin/status.rs`) is updated by every layer and read by
//! the admin API.

pub mod admin;
pub(crate) mod backoff;
pub mod control;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fallback;
pub mod forward;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod nat;
pub mod path;
pub mod peer;
pub mod portmap;
pub mod punch;
pub mod quic;
pub mod race;
pub(crate) mod reload;
pub mod testdata;
pub mod tunnel;

pub use admin::status::{ForwardDoc, LastPunch, PeerDoc, StatusBoard, StatusDoc};
pub use daemon::{start, start_from_file, DaemonError, ReloadError, RunningDaemon};
pub use identity::{Identity, IdentityError};
pub use path::{PathState, Transport};
pub use portmap::PortMappingDoc;
pub use testdata::{hex, pattern};
