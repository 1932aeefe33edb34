//! `/metrics`: the status snapshot as Prometheus text, written with the
//! one text writer both binaries share (`punch_service::prometheus`). The
//! names, labels and values are what dashboards and the lab read: add
//! families, never rename them.

use std::sync::atomic::Ordering;

use punch_service::prometheus::{Exposition, Kind};

use super::status::{ForwardDoc, PeerDoc, StatusBoard, StatusDoc, Transport};

/// Renders every family from one snapshot of `board`.
pub(crate) fn render(board: &StatusBoard) -> String {
    let doc = board.snapshot();
    let mut out = Exposition::new();
    out.family(
        "punchd_rendezvous_connected",
        Kind::Gauge,
        "1 when registered with the rendezvous server.",
    )
    .sample(&[], u8::from(doc.rendezvous == "connected"));
    out.family(
        "punchd_orders_refused_total",
        Kind::Counter,
        "Punch orders refused: not signed by the pinned [rendezvous] server_key.",
    )
    .sample(&[], board.orders_refused.load(Ordering::Relaxed));
    out.family(
        "punchd_orders_late_total",
        Kind::Counter,
        "Punch orders that arrived after their firing time and fired at once, so the two sides' SYNs did not leave together.",
    )
    .sample(&[], board.orders_late.load(Ordering::Relaxed));
    let mut reloads = out.family(
        "punchd_reloads_total",
        Kind::Counter,
        "Config reloads (SIGHUP, punchd reload): applied, or refused with the running config kept.",
    );
    for (result, n) in ["ok", "refused"].iter().zip(&board.reloads) {
        reloads.sample(&[("result", result)], n.load(Ordering::Relaxed));
    }
    let mut limits = out.family(
        "punchd_limit_refusals_total",
        Kind::Counter,
        "Inputs refused or trimmed by a limit (README, Limits), by reason.",
    );
    for (reason, n) in board.limits.all() {
        limits.sample(&[("reason", reason)], n);
    }

    port_mapping(&mut out, board);
    nat(&mut out, board, &doc);
    paths(&mut out, &doc);
    if let Some(n) = doc.quic_connections {
        out.family(
            "punchd_quic_connections",
            Kind::Gauge,
            "QUIC connections open on the endpoint (including closing ones).",
        )
        .sample(&[], n);
    }
    traffic(&mut out, &doc);
    punches(&mut out, &doc, board);
    forwards(&mut out, &doc);
    out.finish()
}

/// The port mapper's work by protocol (`upnp`, `nat-pmp`, `pcp`).
fn port_mapping(out: &mut Exposition, board: &StatusBoard) {
    let rows: Vec<(&str, [u64; 4])> = board.portmap.counters.all().collect();
    for (i, (name, help)) in [
        ("punchd_portmap_probes_total", "Port-mapping probes sent to the default gateway, by protocol."),
        ("punchd_portmap_mappings_total", "Port mappings the gateway granted, by protocol."),
        ("punchd_portmap_renewals_total", "Port mappings renewed, by protocol."),
        ("punchd_portmap_failures_total", "Port-mapping requests refused, answered with junk, or renewals that failed, by protocol."),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = out.family(name, Kind::Counter, help);
        for (protocol, counts) in &rows {
            f.sample(&[("protocol", protocol)], counts[i]);
        }
    }
    let doc = board.portmap.doc();
    let mut f = out.family(
        "punchd_portmap_mapped",
        Kind::Gauge,
        "1 for the protocol holding the punch port's mapping now.",
    );
    for (protocol, _) in &rows {
        f.sample(
            &[("protocol", protocol)],
            u8::from(doc.protocol.as_deref() == Some(*protocol)),
        );
    }
}

/// NAT discovery: the verdict per transport (one-hot over the mapping
/// words, all 0 before the first check) and the checks run.
fn nat(out: &mut Exposition, board: &StatusBoard, doc: &StatusDoc) {
    let mut f = out.family(
        "punchd_nat_mapping",
        Kind::Gauge,
        "How the NAT maps each transport (NAT discovery), one-hot: endpoint-independent, endpoint-dependent, blocked, unknown.",
    );
    for transport in ["tcp", "udp"] {
        let now = doc.nat.as_ref().map(|n| match transport {
            "tcp" => n.mapping_tcp.as_str(),
            _ => n.mapping_udp.as_str(),
        });
        for mapping in [
            "endpoint-independent",
            "endpoint-dependent",
            "blocked",
            "unknown",
        ] {
            f.sample(
                &[("transport", transport), ("mapping", mapping)],
                u8::from(now == Some(mapping)),
            );
        }
    }
    out.family(
        "punchd_nat_checks_total",
        Kind::Counter,
        "NAT discovery checks run (at start, on a gateway change, every 30 min at a registration).",
    )
    .sample(&[], board.nat.checks.load(Ordering::Relaxed));
    out.family(
        "punchd_nat_changes_total",
        Kind::Counter,
        "NAT discovery checks whose verdict differed from the one before.",
    )
    .sample(&[], board.nat.changes.load(Ordering::Relaxed));
}

/// The path and transport of each peer's tunnel, one-hot.
fn paths(out: &mut Exposition, doc: &StatusDoc) {
    // One sample per peer and possible value, 1 for the current one.
    let one_hot = |out: &mut Exposition,
                   name: &str,
                   help: &str,
                   label: &str,
                   values: [&str; 3],
                   current: &dyn Fn(&PeerDoc) -> &str| {
        let mut f = out.family(name, Kind::Gauge, help);
        for p in &doc.peers {
            for v in values {
                f.sample(&[("peer", &p.name), (label, v)], u8::from(current(p) == v));
            }
        }
    };
    one_hot(
        out,
        "punchd_peer_path",
        "1 for the path each peer's tunnel takes now.",
        "path",
        ["direct", "relayed", "none"],
        &|p| p.path.as_str(),
    );
    one_hot(
        out,
        "punchd_peer_transport",
        "1 for the transport under each peer's tunnel now (tcp, quic or relay).",
        "transport",
        ["tcp", "quic", "relay"],
        &|p| p.transport.map_or("", Transport::as_str),
    );
    let mut f = out.family(
        "punchd_peer_family",
        Kind::Gauge,
        "1 for the address family each peer's tunnel runs over now (ipv4 or ipv6).",
    );
    for p in &doc.peers {
        for v in ["ipv4", "ipv6"] {
            f.sample(
                &[("peer", &p.name), ("family", v)],
                u8::from(p.family.as_deref() == Some(v)),
            );
        }
    }
}

/// RTT, bytes and streams per peer.
fn traffic(out: &mut Exposition, doc: &StatusDoc) {
    {
        let mut f = out.family(
            "punchd_peer_rtt_seconds",
            Kind::Gauge,
            "Tunnel RTT from keepalive pings.",
        );
        for p in &doc.peers {
            f.sample(
                &[("peer", &p.name)],
                p.rtt_ms.map_or(f64::NAN, |r| r / 1000.0),
            );
        }
    }
    {
        let mut f = out.family(
            "punchd_peer_bytes_total",
            Kind::Counter,
            "Tunnel bytes on the wire.",
        );
        for p in &doc.peers {
            for (d, v) in [("in", p.bytes_in), ("out", p.bytes_out)] {
                f.sample(&[("peer", &p.name), ("direction", d)], v);
            }
        }
    }
    {
        let mut f = out.family(
            "punchd_peer_streams",
            Kind::Gauge,
            "Streams open in the tunnel.",
        );
        for p in &doc.peers {
            f.sample(&[("peer", &p.name)], p.streams);
        }
    }
}

/// Punch sessions and attempts per peer (counters kept beside the doc).
fn punches(out: &mut Exposition, doc: &StatusDoc, board: &StatusBoard) {
    let peers = board.peers();
    let peer_status = |name: &str| peers.iter().find(|s| s.name == name);
    {
        let mut f = out.family(
            "punchd_punches_total",
            Kind::Counter,
            "Punch sessions by result.",
        );
        for p in &doc.peers {
            let s = peer_status(&p.name);
            let ok = s.map_or(0, |s| s.punches_ok.load(Ordering::Relaxed));
            let failed = s.map_or(0, |s| s.punches_failed.load(Ordering::Relaxed));
            for (r, v) in [("ok", ok), ("failed", failed)] {
                f.sample(&[("peer", &p.name), ("result", r)], v);
            }
        }
    }
    {
        let mut f = out.family(
            "punchd_punch_attempts_total",
            Kind::Counter,
            "connect() attempts made while punching.",
        );
        for p in &doc.peers {
            let v = peer_status(&p.name).map_or(0, |s| s.punch_attempts.load(Ordering::Relaxed));
            f.sample(&[("peer", &p.name)], v);
        }
    }
}

/// Active and total connections per forward.
fn forwards(out: &mut Exposition, doc: &StatusDoc) {
    let per_forward = |out: &mut Exposition,
                       name: &str,
                       kind: Kind,
                       help: &str,
                       value: &dyn Fn(&ForwardDoc) -> String| {
        let mut f = out.family(name, kind, help);
        for x in &doc.forwards {
            f.sample(
                &[
                    ("listen", &x.listen),
                    ("peer", &x.peer),
                    ("service", &x.service),
                ],
                value(x),
            );
        }
    };
    per_forward(
        out,
        "punchd_forward_active",
        Kind::Gauge,
        "Connections being forwarded per forward.",
        &|f| f.active.to_string(),
    );
    per_forward(
        out,
        "punchd_forward_connections_total",
        Kind::Counter,
        "Connections accepted per forward.",
        &|f| f.total.to_string(),
    );
    per_forward(
        out,
        "punchd_forward_refused_total",
        Kind::Counter,
        "Connections refused per forward because it carried its cap of concurrent connections.",
        &|f| f.refused.to_string(),
    );
    per_forward(
        out,
        "punchd_forward_datagrams_out_total",
        Kind::Counter,
        "UDP forwards: datagrams from local clients carried to the peer.",
        &|f| f.datagrams_out.to_string(),
    );
    per_forward(
        out,
        "punchd_forward_datagrams_in_total",
        Kind::Counter,
        "UDP forwards: datagrams from the peer's service delivered to local clients.",
        &|f| f.datagrams_in.to_string(),
    );
    per_forward(
        out,
        "punchd_forward_datagrams_dropped_total",
        Kind::Counter,
        "UDP forwards: datagrams dropped (a flow's queue full, no tunnel, or undeliverable).",
        &|f| f.datagrams_dropped.to_string(),
    );
}
