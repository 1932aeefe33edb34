//! Counters behind `GET /metrics`, rendered in the Prometheus text format.
//! Plain atomics: the server's hot paths only ever add to them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::protocol::{ErrorCode, PathKind};

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
}

impl Metrics {
    pub(crate) fn refused(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
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
        let mut out = String::with_capacity(2048);
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "punch_rendezvous_connected_daemons",
            "gauge",
            "Daemons registered right now.",
            &one(g(&self.connected).to_string()),
        );
        metric(
            "punch_rendezvous_connections_total",
            "counter",
            "WebSocket connections accepted.",
            &one(c(&self.connections).to_string()),
        );
        metric(
            "punch_rendezvous_punches_coordinated_total",
            "counter",
            "Punch orders sent to a pair of daemons.",
            &one(c(&self.punches).to_string()),
        );
        let results: Vec<_> = ["direct", "relayed", "none"]
            .iter()
            .zip(&self.results)
            .map(|(p, v)| (format!("{{path=\"{p}\"}}"), c(v).to_string()))
            .collect();
        metric(
            "punch_rendezvous_punch_results_total",
            "counter",
            "Punch results reported by daemons, by resulting path.",
            &results,
        );
        let refusals: Vec<_> = ErrorCode::ALL
            .iter()
            .zip(&self.refusals)
            .map(|(code, v)| {
                (
                    format!("{{reason=\"{}\"}}", code.as_str()),
                    c(v).to_string(),
                )
            })
            .collect();
        metric(
            "punch_rendezvous_refusals_total",
            "counter",
            "Requests or connections refused, by reason.",
            &refusals,
        );
        metric(
            "punch_rendezvous_relays_active",
            "gauge",
            "Relayed sessions carrying bytes now.",
            &one(g(&self.relays_active).to_string()),
        );
        metric(
            "punch_rendezvous_relays_total",
            "counter",
            "Relayed sessions paired.",
            &one(c(&self.relays).to_string()),
        );
        metric(
            "punch_rendezvous_relay_bytes_total",
            "counter",
            "Ciphertext bytes carried by the relay.",
            &one(c(&self.relay_bytes).to_string()),
        );
        metric(
            "punch_rendezvous_udp_probes_total",
            "counter",
            "Valid UDP probes acknowledged (QUIC path endpoint observations).",
            &one(c(&self.udp_probes).to_string()),
        );
        metric(
            "punch_rendezvous_udp_dropped_total",
            "counter",
            "UDP datagrams dropped: malformed, unknown daemon, replayed, bad signature or rate-limited.",
            &one(c(&self.udp_dropped).to_string()),
        );
        out
    }
}
