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
//! | `punch_rendezvous_udp_dropped_total` | counter | |
//! | `punch_rendezvous_relay_refusals_total` | counter | `reason`: every [`RelayRefusal`] |
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
}

impl RelayRefusal {
    /// Every reason, in the order they are rendered.
    pub(crate) const ALL: [RelayRefusal; 7] = [
        RelayRefusal::UnknownSession,
        RelayRefusal::WrongToken,
        RelayRefusal::StoreUnavailable,
        RelayRefusal::DaemonCap,
        RelayRefusal::ServerCap,
        RelayRefusal::PairTimeout,
        RelayRefusal::Replaced,
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
        }
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
"#;

    #[test]
    fn exposition_is_unchanged() {
        let m = Metrics::default();
        m.connected.store(3, Ordering::Relaxed);
        m.connections.store(7, Ordering::Relaxed);
        m.result(PathKind::Relayed);
        m.refused(ErrorCode::Busy);
        m.relay_bytes.store(1234, Ordering::Relaxed);
        assert_eq!(m.render(), format!("{BEFORE}{ADDED}"));
    }
}
