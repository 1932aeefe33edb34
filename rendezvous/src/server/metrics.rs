//! Counters behind `GET /metrics`, rendered in the Prometheus text format
//! by the writer both binaries share ([`punch_service::prometheus`]).
//! Plain atomics: the server's hot paths only ever add to them.
//!
//! The families (names, types and labels are a contract; `tests/metrics.rs`
//! parses a live server's text and checks each):
//!
//! | family | type | labels |
//! |---|---|---|
//! | `punch_rendezvous_connected_daemons` | gauge | |
//! | `punch_rendezvous_connections_total` | counter | |
//! | `punch_rendezvous_punches_coordinated_total` | counter | |
//! | `punch_rendezvous_punch_results_total` | counter | `path`: `direct`, `relayed`, `none` |
//! | `punch_rendezvous_refusals_total` | counter | `reason`: every [`ErrorCode`] |
//! | `punch_rendezvous_relays_active` | gauge | |
//! | `punch_rendezvous_relays_total` | counter | |
//! | `punch_rendezvous_relay_bytes_total` | counter | |
//! | `punch_rendezvous_udp_probes_total` | counter | |
//! | `punch_rendezvous_observe_answered_total` | counter | `transport`: `tcp`, `udp` (NAT discovery, `server/observe.rs`) |
//! | `punch_rendezvous_observe_refused_total` | counter | `transport`: `tcp`, `udp` |
//! | `punch_rendezvous_udp_dropped_total` | counter | |
//! | `punch_rendezvous_relay_refusals_total` | counter | `reason`: every [`RelayRefusal`] |
//! | `punch_rendezvous_connections_open` | gauge | |
//! | `punch_rendezvous_connection_refusals_total` | counter | `reason`: every [`ConnRefusal`] |
//! | `punch_rendezvous_punch_refusals_total` | counter | `reason`: every [`PunchRefusal`] |
//! | `punch_rendezvous_local_addrs_dropped_total` | counter | `reason`: every [`AddrRefusal`] |
//! | `punch_rendezvous_udp_drops_total` | counter | `reason`: every [`UdpDrop`] |
//!
//! Every relay refusal also counts as `refusals_total{reason="relay_refused"}`;
//! the relay family says which bound or check it was.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use punch_service::prometheus::{Exposition, Kind};

use crate::protocol::{ErrorCode, PathKind};

/// Why the relay turned a side away: the `reason` label of
/// `punch_rendezvous_relay_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayRefusal {
    /// No such session (never created, expired, or already paired): 404,
    /// or a close after the upgrade if it went in between.
    UnknownSession,
    /// The token is not one of this session's two: 403.
    WrongToken,
    /// The store could not be asked: 503.
    StoreUnavailable,
    /// `max_relays_per_daemon` relay sockets held by this daemon: 429.
    DaemonCap,
    /// `max_relays` sessions' worth of relay sockets held: 503.
    ServerCap,
    /// The other side did not join in time: close 1013.
    PairTimeout,
    /// A newer join of the same side took this one's place: close 1008.
    Replaced,
    /// A paired relay carried nothing for `relay_idle_timeout`: close 1000.
    IdleTimeout,
    /// A paired relay reached `relay_max_lifetime`: close 1000.
    MaxLifetime,
}

impl RelayRefusal {
    /// Every reason, in the order they are rendered.
    pub(crate) const ALL: [RelayRefusal; 9] = [
        RelayRefusal::UnknownSession,
        RelayRefusal::WrongToken,
        RelayRefusal::StoreUnavailable,
        RelayRefusal::DaemonCap,
        RelayRefusal::ServerCap,
        RelayRefusal::PairTimeout,
        RelayRefusal::Replaced,
        RelayRefusal::IdleTimeout,
        RelayRefusal::MaxLifetime,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RelayRefusal::UnknownSession => "unknown_session",
            RelayRefusal::WrongToken => "wrong_token",
            RelayRefusal::StoreUnavailable => "store_unavailable",
            RelayRefusal::DaemonCap => "daemon_cap",
            RelayRefusal::ServerCap => "server_cap",
            RelayRefusal::PairTimeout => "pair_timeout",
            RelayRefusal::Replaced => "replaced",
            RelayRefusal::IdleTimeout => "idle_timeout",
            RelayRefusal::MaxLifetime => "max_lifetime",
        }
    }
}

/// A `reason` label enum: its variants, in render order, and their values.
macro_rules! reasons {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name { $($(#[$vm])* $v,)* }
        impl $name {
            /// Every reason, in the order they are rendered.
            pub(crate) const ALL: &'static [$name] = &[$($name::$v,)*];
            /// The label value.
            pub(crate) fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }
    };
}

reasons! {
    /// Why a TCP connection was closed before it could serve a request:
    /// `punch_rendezvous_connection_refusals_total{reason}`.
    ConnRefusal {
        /// `max_connections` held: closed at accept.
        Total => "total",
        /// `max_http_per_ip` not-yet-WebSocket connections from this IP.
        PerIp => "per_ip",
        /// No complete request head within `header_read_timeout`.
        HeaderTimeout => "header_timeout",
        /// TLS handshake failed or took longer than its bound.
        TlsHandshake => "tls_handshake",
    }
}

reasons! {
    /// Why a `connect` got no punch:
    /// `punch_rendezvous_punch_refusals_total{reason}`.
    PunchRefusal {
        /// The requester has `max_pending_punches_per_daemon` pending.
        RequesterCap => "requester_cap",
        /// `max_pending_punches` pending on the server.
        ServerCap => "server_cap",
        /// An order could not be queued (a side backed up or gone); the
        /// session was withdrawn.
        Undelivered => "undelivered",
    }
}

reasons! {
    /// Why an address in a hello's `local_addrs` was not kept:
    /// `punch_rendezvous_local_addrs_dropped_total{reason}`.
    AddrRefusal {
        /// More than the hello may carry (the whole hello is refused).
        TooMany => "too_many",
        /// Not a LAN-style address (public unicast).
        NotLan => "not_lan",
        /// Loopback, from a daemon that is not on this host.
        Loopback => "loopback",
        /// Link-local (needs a scope a peer cannot know).
        LinkLocal => "link_local",
        /// Multicast or broadcast.
        Multicast => "multicast",
        /// Unspecified address or port 0.
        Unspecified => "unspecified",
        /// A `mapped_tcp`/`mapped_udp` endpoint on another IP than the
        /// one the server observes (a router's mapping is on its own
        /// public address, which is what the server sees).
        MappedNotObserved => "mapped_not_observed",
    }
}

reasons! {
    /// Why a UDP datagram was dropped:
    /// `punch_rendezvous_udp_drops_total{reason}`.
    UdpDrop {
        /// Not a probe.
        Malformed => "malformed",
        /// Names no registered daemon.
        UnknownName => "unknown_name",
        /// Counter not above the last accepted one.
        Replay => "replay",
        /// Over the per-source-address rate.
        SourceRate => "source_rate",
        /// Over the server-wide verification rate.
        ServerRate => "server_rate",
        /// The signature does not verify.
        BadSignature => "bad_signature",
        /// A valid probe over its daemon's rate.
        DaemonRate => "daemon_rate",
        /// The registration changed while it was checked.
        Stale => "stale",
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Registered daemons right now.
    pub(crate) connected: AtomicI64,
    /// WebSocket connections accepted since start.
    pub(crate) connections: AtomicU64,
    /// Punch orders sent (one per pair).
    pub(crate) punches: AtomicU64,
    /// Results reported, by path: direct, relayed, none.
    pub(crate) results: [AtomicU64; 3],
    /// Refusals by [`ErrorCode`], indexed like `ErrorCode::ALL`.
    pub(crate) refusals: [AtomicU64; ErrorCode::ALL.len()],
    /// Relayed sessions running now.
    pub(crate) relays_active: AtomicI64,
    /// Relayed sessions paired since start.
    pub(crate) relays: AtomicU64,
    /// Bytes carried by the relay, both directions.
    pub(crate) relay_bytes: AtomicU64,
    /// Valid UDP probes (each one acknowledged).
    pub(crate) udp_probes: AtomicU64,
    /// UDP datagrams dropped: not a probe, unknown name, replayed, bad
    /// signature or over the rate limit.
    pub(crate) udp_dropped: AtomicU64,
    /// Relay refusals by [`RelayRefusal`], indexed like `RelayRefusal::ALL`.
    pub(crate) relay_refusals: [AtomicU64; RelayRefusal::ALL.len()],
    /// TCP connections held now.
    pub(crate) connections_open: AtomicI64,
    pub(crate) conn_refusals: [AtomicU64; ConnRefusal::ALL.len()],
    pub(crate) punch_refusals: [AtomicU64; PunchRefusal::ALL.len()],
    pub(crate) addr_refusals: [AtomicU64; AddrRefusal::ALL.len()],
    pub(crate) udp_drops: [AtomicU64; UdpDrop::ALL.len()],
}

/// Adds one to the counter of `why` in `counts` (indexed like `all`).
fn bump<T: PartialEq>(all: &[T], counts: &[AtomicU64], why: &T) {
    if let Some(i) = all.iter().position(|r| r == why) {
        counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub(crate) fn refused(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a relay refusal under its own reason and as `relay_refused`.
    pub(crate) fn relay_refused(&self, why: RelayRefusal) {
        self.refused(ErrorCode::RelayRefused);
        if let Some(i) = RelayRefusal::ALL.iter().position(|r| *r == why) {
            self.relay_refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn conn_refused(&self, why: ConnRefusal) {
        bump(ConnRefusal::ALL, &self.conn_refusals, &why);
    }

    pub(crate) fn punch_refused(&self, why: PunchRefusal) {
        bump(PunchRefusal::ALL, &self.punch_refusals, &why);
    }

    pub(crate) fn addr_refused(&self, why: AddrRefusal) {
        bump(AddrRefusal::ALL, &self.addr_refusals, &why);
    }

    /// Counts a dropped datagram under its reason and in `udp_dropped`.
    pub(crate) fn udp_drop(&self, why: UdpDrop) {
        self.udp_dropped.fetch_add(1, Ordering::Relaxed);
        bump(UdpDrop::ALL, &self.udp_drops, &why);
    }

    pub(crate) fn result(&self, path: PathKind) {
        let i = match path {
            PathKind::Direct => 0,
            PathKind::Relayed => 1,
            PathKind::None => 2,
        };
        self.results[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut out = Exposition::new();
        out.family(
            "punch_rendezvous_connected_daemons",
            Kind::Gauge,
            "Daemons registered right now.",
        )
        .sample(&[], g(&self.connected));
        out.family(
            "punch_rendezvous_connections_total",
            Kind::Counter,
            "WebSocket connections accepted.",
        )
        .sample(&[], c(&self.connections));
        out.family(
            "punch_rendezvous_punches_coordinated_total",
            Kind::Counter,
            "Punch orders sent to a pair of daemons.",
        )
        .sample(&[], c(&self.punches));
        let mut results = out.family(
            "punch_rendezvous_punch_results_total",
            Kind::Counter,
            "Punch results reported by daemons, by resulting path.",
        );
        for (path, v) in ["direct", "relayed", "none"].iter().zip(&self.results) {
            results.sample(&[("path", path)], c(v));
        }
        by_reason(
            &mut out,
            "punch_rendezvous_refusals_total",
            "Requests or connections refused, by reason.",
            ErrorCode::ALL.iter().map(|code| code.as_str()),
            &self.refusals,
        );
        out.family(
            "punch_rendezvous_relays_active",
            Kind::Gauge,
            "Relayed sessions carrying bytes now.",
        )
        .sample(&[], g(&self.relays_active));
        out.family(
            "punch_rendezvous_relays_total",
            Kind::Counter,
            "Relayed sessions paired.",
        )
        .sample(&[], c(&self.relays));
        out.family(
            "punch_rendezvous_relay_bytes_total",
            Kind::Counter,
            "Ciphertext bytes carried by the relay.",
        )
        .sample(&[], c(&self.relay_bytes));
        out.family(
            "punch_rendezvous_udp_probes_total",
            Kind::Counter,
            "Valid UDP probes acknowledged (QUIC path endpoint observations).",
        )
        .sample(&[], c(&self.udp_probes));
        out.family(
            "punch_rendezvous_udp_dropped_total",
            Kind::Counter,
            "UDP datagrams dropped: malformed, unknown daemon, replayed, bad signature or rate-limited.",
        )
        .sample(&[], c(&self.udp_dropped));
        by_reason(
            &mut out,
            "punch_rendezvous_relay_refusals_total",
            "Relay joins refused or closed unpaired, by reason.",
            RelayRefusal::ALL.iter().map(|why| why.as_str()),
            &self.relay_refusals,
        );
        out.family(
            "punch_rendezvous_connections_open",
            Kind::Gauge,
            "TCP connections held now, in every state.",
        )
        .sample(&[], g(&self.connections_open));
        by_reason(
            &mut out,
            "punch_rendezvous_connection_refusals_total",
            "TCP connections closed by a connection bound, by reason.",
            ConnRefusal::ALL.iter().map(|why| why.as_str()),
            &self.conn_refusals,
        );
        by_reason(
            &mut out,
            "punch_rendezvous_punch_refusals_total",
            "Connect requests that got no punch, by bound.",
            PunchRefusal::ALL.iter().map(|why| why.as_str()),
            &self.punch_refusals,
        );
        by_reason(
            &mut out,
            "punch_rendezvous_local_addrs_dropped_total",
            "Hello local addresses not passed on as candidates, by reason.",
            AddrRefusal::ALL.iter().map(|why| why.as_str()),
            &self.addr_refusals,
        );
        by_reason(
            &mut out,
            "punch_rendezvous_udp_drops_total",
            "UDP datagrams dropped, by reason.",
            UdpDrop::ALL.iter().map(|why| why.as_str()),
            &self.udp_drops,
        );
        out.finish()
    }
}

/// A counter family with one sample per reason, in the reasons' order.
fn by_reason<'a>(
    out: &mut Exposition,
    name: &str,
    help: &str,
    reasons: impl Iterator<Item = &'a str>,
    counts: &[AtomicU64],
) {
    let mut family = out.family(name, Kind::Counter, help);
    for (reason, v) in reasons.zip(counts) {
        family.sample(&[("reason", reason)], v.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text the hand-written renderer produced before it moved onto the
    /// shared writer: names, labels, HELP texts and values are a contract.
    const BEFORE: &str = r#"# HELP punch_rendezvous_connected_daemons Daemons registered right now.
# TYPE punch_rendezvous_connected_daemons gauge
punch_rendezvous_connected_daemons 3
# HELP punch_rendezvous_connections_total WebSocket connections accepted.
# TYPE punch_rendezvous_connections_total counter
punch_rendezvous_connections_total 7
# HELP punch_rendezvous_punches_coordinated_total Punch orders sent to a pair of daemons.
# TYPE punch_rendezvous_punches_coordinated_total counter
punch_rendezvous_punches_coordinated_total 0
# HELP punch_rendezvous_punch_results_total Punch results reported by daemons, by resulting path.
# TYPE punch_rendezvous_punch_results_total counter
punch_rendezvous_punch_results_total{path="direct"} 0
punch_rendezvous_punch_results_total{path="relayed"} 1
punch_rendezvous_punch_results_total{path="none"} 0
# HELP punch_rendezvous_refusals_total Requests or connections refused, by reason.
# TYPE punch_rendezvous_refusals_total counter
punch_rendezvous_refusals_total{reason="bad_token"} 0
punch_rendezvous_refusals_total{reason="bad_signature"} 0
punch_rendezvous_refusals_total{reason="name_taken"} 0
punch_rendezvous_refusals_total{reason="version_mismatch"} 0
punch_rendezvous_refusals_total{reason="unknown_peer"} 0
punch_rendezvous_refusals_total{reason="self_connect"} 0
punch_rendezvous_refusals_total{reason="rate_limited"} 0
punch_rendezvous_refusals_total{reason="malformed"} 0
punch_rendezvous_refusals_total{reason="too_many_clients"} 0
punch_rendezvous_refusals_total{reason="busy"} 1
punch_rendezvous_refusals_total{reason="not_registered"} 0
punch_rendezvous_refusals_total{reason="replaced"} 0
punch_rendezvous_refusals_total{reason="shutting_down"} 0
punch_rendezvous_refusals_total{reason="timeout"} 0
punch_rendezvous_refusals_total{reason="relay_refused"} 0
# HELP punch_rendezvous_relays_active Relayed sessions carrying bytes now.
# TYPE punch_rendezvous_relays_active gauge
punch_rendezvous_relays_active 0
# HELP punch_rendezvous_relays_total Relayed sessions paired.
# TYPE punch_rendezvous_relays_total counter
punch_rendezvous_relays_total 0
# HELP punch_rendezvous_relay_bytes_total Ciphertext bytes carried by the relay.
# TYPE punch_rendezvous_relay_bytes_total counter
punch_rendezvous_relay_bytes_total 1234
# HELP punch_rendezvous_udp_probes_total Valid UDP probes acknowledged (QUIC path endpoint observations).
# TYPE punch_rendezvous_udp_probes_total counter
punch_rendezvous_udp_probes_total 0
# HELP punch_rendezvous_udp_dropped_total UDP datagrams dropped: malformed, unknown daemon, replayed, bad signature or rate-limited.
# TYPE punch_rendezvous_udp_dropped_total counter
punch_rendezvous_udp_dropped_total 0
"#;

    /// The family added after it, rendered last so the text above stays.
    const ADDED: &str = r#"# HELP punch_rendezvous_relay_refusals_total Relay joins refused or closed unpaired, by reason.
# TYPE punch_rendezvous_relay_refusals_total counter
punch_rendezvous_relay_refusals_total{reason="unknown_session"} 0
punch_rendezvous_relay_refusals_total{reason="wrong_token"} 0
punch_rendezvous_relay_refusals_total{reason="store_unavailable"} 0
punch_rendezvous_relay_refusals_total{reason="daemon_cap"} 0
punch_rendezvous_relay_refusals_total{reason="server_cap"} 0
punch_rendezvous_relay_refusals_total{reason="pair_timeout"} 0
punch_rendezvous_relay_refusals_total{reason="replaced"} 0
punch_rendezvous_relay_refusals_total{reason="idle_timeout"} 0
punch_rendezvous_relay_refusals_total{reason="max_lifetime"} 0
"#;

    #[test]
    fn exposition_is_unchanged() {
        let m = Metrics::default();
        m.connected.store(3, Ordering::Relaxed);
        m.connections.store(7, Ordering::Relaxed);
        m.result(PathKind::Relayed);
        m.refused(ErrorCode::Busy);
        m.relay_bytes.store(1234, Ordering::Relaxed);
        let text = m.render();
        assert!(text.starts_with(&format!("{BEFORE}{ADDED}")), "{text}");
        for family in [
            "punch_rendezvous_connections_open 0",
            "punch_rendezvous_connection_refusals_total{reason=\"per_ip\"} 0",
            "punch_rendezvous_punch_refusals_total{reason=\"requester_cap\"} 0",
            "punch_rendezvous_local_addrs_dropped_total{reason=\"not_lan\"} 0",
            "punch_rendezvous_udp_drops_total{reason=\"bad_signature\"} 0",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
    }
}
