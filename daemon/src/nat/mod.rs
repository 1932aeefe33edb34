//! NAT discovery's results: how this host's NAT maps TCP and UDP.
//!
//! [`classify`] turns observations into a verdict (sans IO); the probing
//! itself is `control/netcheck.rs` (it speaks to the rendezvous). This
//! module holds what the rest of the daemon reads: the [`NatDoc`] that
//! `punchd netcheck --json` prints and status carries under `nat`, and the
//! [`Board`] the daemon's discovery task updates (status, `/metrics`, and
//! the next hello).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use punch_rendezvous::nat::{Mapping, NatSummary, TransportNat, Unsolicited};
use serde::{Deserialize, Serialize};

pub mod classify;

/// What discovery found, as printed by `punchd netcheck --json` and shown
/// in status under `nat` (DESIGN.md, "NAT discovery").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatDoc {
    /// `endpoint-independent`, `endpoint-dependent`, `blocked` (or
    /// `unknown` when only one endpoint answered).
    pub mapping_tcp: String,
    /// The same for UDP (the QUIC path).
    pub mapping_udp: String,
    /// Which of `upnp`, `nat-pmp`, `pcp` answered on the default gateway.
    #[serde(default)]
    pub port_mapping: Vec<String>,
    /// The public port equaled the local port in every TCP observation.
    #[serde(default)]
    pub port_preserved_tcp: bool,
    /// The same for UDP.
    #[serde(default)]
    pub port_preserved_udp: bool,
    /// The step between consecutive new TCP mappings, when predictable.
    #[serde(default)]
    pub delta_tcp: Option<i32>,
    /// The same for UDP.
    #[serde(default)]
    pub delta_udp: Option<i32>,
    /// What the NAT did with an unsolicited SYN to a TCP mapping:
    /// `dropped`, `rst`, `reached` or `unreachable` (`None`: the server
    /// did not test it).
    #[serde(default)]
    pub unsolicited_tcp: Option<String>,
    /// The public IPv4 address the rendezvous saw, if any answered.
    #[serde(default)]
    pub public_ip: Option<String>,
    /// Every TCP observation, `local port -> endpoint: seen` (for people).
    #[serde(default)]
    pub observed_tcp: Vec<String>,
    /// Every UDP observation.
    #[serde(default)]
    pub observed_udp: Vec<String>,
    /// How long the check took.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// When it finished.
    #[serde(default)]
    pub checked_unix_ms: u64,
}

impl NatDoc {
    /// The part the hello carries.
    pub fn summary(&self) -> NatSummary {
        let t = |m: &str, preserved, delta| TransportNat {
            mapping: parse_mapping(m),
            port_preserved: preserved,
            delta,
            unsolicited: None,
        };
        NatSummary {
            tcp: TransportNat {
                unsolicited: self.unsolicited_tcp.as_deref().and_then(Unsolicited::parse),
                ..t(&self.mapping_tcp, self.port_preserved_tcp, self.delta_tcp)
            },
            udp: t(&self.mapping_udp, self.port_preserved_udp, self.delta_udp),
        }
    }

    /// The short report `punchd netcheck` prints.
    pub fn human(&self) -> String {
        let line = |m: &str, preserved: bool, delta: Option<i32>| {
            let mut s = m.to_owned();
            if preserved {
                s.push_str(", port preserved");
            }
            if let Some(d) = delta {
                s.push_str(&format!(", predictable (next port = last {d:+})"));
            } else if m == "endpoint-dependent" {
                s.push_str(", ports unpredictable");
            }
            s
        };
        let mut out = String::from("NAT report:\n");
        out.push_str(&format!(
            "  * public IPv4: {}\n",
            self.public_ip.as_deref().unwrap_or("(none seen)")
        ));
        out.push_str(&format!(
            "  * TCP mapping: {}\n",
            line(&self.mapping_tcp, self.port_preserved_tcp, self.delta_tcp)
        ));
        out.push_str(&format!(
            "  * UDP mapping: {}\n",
            line(&self.mapping_udp, self.port_preserved_udp, self.delta_udp)
        ));
        out.push_str(&format!(
            "  * unsolicited SYN: {}\n",
            match self.unsolicited_tcp.as_deref() {
                Some("dropped") => "dropped (the NAT stays silent)",
                Some("rst") => "answered with RST",
                Some("reached") => "reached this host (the mapping takes unsolicited connections)",
                Some("unreachable") => "answered with an ICMP error",
                _ => "not tested (the rendezvous does not offer the test)",
            }
        ));
        out.push_str(&format!(
            "  * port mapping: {}\n",
            if self.port_mapping.is_empty() {
                "none answered".to_owned()
            } else {
                self.port_mapping.join(", ")
            }
        ));
        for (what, obs) in [("TCP", &self.observed_tcp), ("UDP", &self.observed_udp)] {
            if !obs.is_empty() {
                out.push_str(&format!("  * {what} seen: {}\n", obs.join("; ")));
            }
        }
        out.push_str(&format!("  (checked in {} ms)\n", self.elapsed_ms));
        out
    }
}

fn parse_mapping(m: &str) -> Mapping {
    match m {
        "endpoint-independent" => Mapping::EndpointIndependent,
        "endpoint-dependent" => Mapping::EndpointDependent,
        "blocked" => Mapping::Blocked,
        _ => Mapping::Unknown,
    }
}

/// The daemon's latest result and its counters.
#[derive(Debug, Default)]
pub struct Board {
    doc: Mutex<Option<NatDoc>>,
    /// Checks run (each one a handful of packets to the rendezvous).
    pub checks: AtomicU64,
    /// Checks whose result differed from the one before.
    pub changes: AtomicU64,
}

impl Board {
    /// The latest result, if a check finished.
    pub fn doc(&self) -> Option<NatDoc> {
        self.doc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records a finished check; true when the verdict changed.
    pub fn set(&self, doc: NatDoc) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let mut cur = self
            .doc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = cur.as_ref().map(NatDoc::summary) != Some(doc.summary());
        if changed && cur.is_some() {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        *cur = Some(doc);
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doc_round_trips_to_the_summary_and_prints_the_design_names() {
        let doc = NatDoc {
            mapping_tcp: "endpoint-dependent".into(),
            mapping_udp: "blocked".into(),
            delta_tcp: Some(256),
            port_mapping: vec!["pcp".into()],
            ..NatDoc::default()
        };
        let s = doc.summary();
        assert_eq!(s.tcp.mapping, Mapping::EndpointDependent);
        assert_eq!(s.tcp.delta, Some(256));
        assert_eq!(s.udp.mapping, Mapping::Blocked);
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["mapping_tcp"], "endpoint-dependent");
        assert_eq!(json["port_mapping"][0], "pcp");
        let text = doc.human();
        assert!(
            text.contains("TCP mapping: endpoint-dependent, predictable (next port = last +256)"),
            "{text}"
        );
        let board = Board::default();
        assert!(board.set(doc.clone()));
        assert!(!board.set(doc));
        assert_eq!(board.checks.load(Ordering::Relaxed), 2);
        assert_eq!(board.changes.load(Ordering::Relaxed), 0);
    }
}
