//! What a running daemon says about itself, read the way users and their
//! tools read it: `/metrics` through a real Prometheus text-format parser,
//! `/v1/status` against the fields DESIGN.md documents, and the
//! `punchd status` table from the real binary, by `--admin` and by
//! `--config`. Each after real traffic through a direct tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use punchd::demo::echo_roundtrip;
use punchd::{pattern, RunningDaemon};
use serde_json::Value as Json;
use tokio::net::TcpStream;

use support::{http_get, wait_for, Lab};

/// alice and bob with a direct tunnel that carried 64 KiB each way (QUIC's
/// byte counts are sampled every 250 ms) and measured an RTT; the
/// forward's one connection has ended.
async fn after_traffic(lab: &Lab) -> (RunningDaemon, RunningDaemon) {
    let (alice, bob) = lab
        .direct_pair(
            &["echo"],
            &[lab.expose_at("echo", lab.echo, &["alice"])],
            "",
        )
        .await;
    let stream = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    echo_roundtrip(stream, &pattern(64 * 1024, 5))
        .await
        .unwrap();
    wait_for(
        "bytes, an RTT, the connection ended",
        Duration::from_secs(10),
        || {
            let doc = alice.status.snapshot();
            let p = &doc.peers[0];
            let counted = p.bytes_in > 64 * 1024 && p.bytes_out > 64 * 1024;
            (counted && p.rtt_ms.is_some() && doc.forwards[0].active == 0).then_some(())
        },
    )
    .await;
    (alice, bob)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A label and the values it may take (`None`: any, e.g. a peer name).
type Label = (&'static str, Option<Vec<&'static str>>);

/// Every family `admin/metrics.rs` writes: name, type, and its labels.
fn documented() -> Vec<(&'static str, Kind, Vec<Label>)> {
    let peer = ("peer", None);
    let forward = vec![("listen", None), ("peer", None), ("service", None)];
    let protocol: Label = ("protocol", Some(vec!["upnp", "nat-pmp", "pcp"]));
    vec![
        ("punchd_rendezvous_connected", Kind::Gauge, vec![]),
        ("punchd_orders_refused_total", Kind::Counter, vec![]),
        ("punchd_orders_late_total", Kind::Counter, vec![]),
        (
            "punchd_reloads_total",
            Kind::Counter,
            vec![("result", Some(vec!["ok", "refused"]))],
        ),
        (
            "punchd_limit_refusals_total",
            Kind::Counter,
            vec![(
                "reason",
                Some(vec![
                    "candidates",
                    "candidate_address",
                    "order_rate",
                    "order_too_far_ahead",
                    "candidate_not_peer",
                ]),
            )],
        ),
        (
            "punchd_peer_path",
            Kind::Gauge,
            vec![
                peer.clone(),
                ("path", Some(vec!["direct", "relayed", "none"])),
            ],
        ),
        (
            "punchd_peer_transport",
            Kind::Gauge,
            vec![
                peer.clone(),
                ("transport", Some(vec!["tcp", "quic", "relay"])),
            ],
        ),
        (
            "punchd_peer_family",
            Kind::Gauge,
            vec![peer.clone(), ("family", Some(vec!["ipv4", "ipv6"]))],
        ),
        ("punchd_quic_connections", Kind::Gauge, vec![]),
        ("punchd_peer_rtt_seconds", Kind::Gauge, vec![peer.clone()]),
        (
            "punchd_peer_bytes_total",
            Kind::Counter,
            vec![peer.clone(), ("direction", Some(vec!["in", "out"]))],
        ),
        ("punchd_peer_streams", Kind::Gauge, vec![peer.clone()]),
        (
            "punchd_punches_total",
            Kind::Counter,
            vec![peer.clone(), ("result", Some(vec!["ok", "failed"]))],
        ),
        ("punchd_punch_attempts_total", Kind::Counter, vec![peer]),
        ("punchd_forward_active", Kind::Gauge, forward.clone()),
        (
            "punchd_forward_connections_total",
            Kind::Counter,
            forward.clone(),
        ),
        (
            "punchd_forward_refused_total",
            Kind::Counter,
            forward.clone(),
        ),
        (
            "punchd_forward_datagrams_out_total",
            Kind::Counter,
            forward.clone(),
        ),
        (
            "punchd_forward_datagrams_in_total",
            Kind::Counter,
            forward.clone(),
        ),
        (
            "punchd_forward_datagrams_dropped_total",
            Kind::Counter,
            forward,
        ),
        (
            "punchd_portmap_probes_total",
            Kind::Counter,
            vec![protocol.clone()],
        ),
        (
            "punchd_portmap_mappings_total",
            Kind::Counter,
            vec![protocol.clone()],
        ),
        (
            "punchd_portmap_renewals_total",
            Kind::Counter,
            vec![protocol.clone()],
        ),
        (
            "punchd_portmap_failures_total",
            Kind::Counter,
            vec![protocol.clone()],
        ),
        ("punchd_portmap_mapped", Kind::Gauge, vec![protocol]),
        (
            "punchd_nat_mapping",
            Kind::Gauge,
            vec![
                ("transport", Some(vec!["tcp", "udp"])),
                (
                    "mapping",
                    Some(vec![
                        "endpoint-independent",
                        "endpoint-dependent",
                        "blocked",
                        "unknown",
                    ]),
                ),
            ],
        ),
        ("punchd_nat_checks_total", Kind::Counter, vec![]),
        ("punchd_nat_changes_total", Kind::Counter, vec![]),
    ]
}

fn value(v: &Value) -> (Kind, f64) {
    match v {
        Value::Counter(x) => (Kind::Counter, *x),
        Value::Gauge(x) => (Kind::Gauge, *x),
        other => panic!("neither counter nor gauge: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_every_family_has_its_type_help_labels_and_values() {
    let lab = Lab::new().await;
    let (alice, bob) = after_traffic(&lab).await;
    let text = http_get(alice.admin_addr, "/metrics").await;
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // Every sample line was parsed (none silently skipped).
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(scrape.samples.len(), sample_lines, "{text}");

    let mut by_family: BTreeMap<&str, Vec<&prometheus_parse::Sample>> = BTreeMap::new();
    for s in &scrape.samples {
        by_family.entry(s.metric.as_str()).or_default().push(s);
    }
    let documented = documented();
    let names: BTreeSet<&str> = documented.iter().map(|(n, _, _)| *n).collect();
    for name in by_family.keys() {
        assert!(names.contains(name), "undocumented family {name}");
    }
    for (name, kind, labels) in &documented {
        let samples = by_family
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert!(
            scrape.docs.get(*name).is_some_and(|h| !h.is_empty()),
            "{name} has no HELP"
        );
        for s in samples {
            assert_eq!(value(&s.value).0, *kind, "{name} type");
            let keys: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = labels.iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, want, "{name} labels");
            for (label, values) in labels {
                if let Some(values) = values {
                    let v = s.labels.get(label).unwrap();
                    assert!(values.contains(&v), "{name}{{{label}={v}}}");
                }
            }
        }
    }
    // The values say what happened: one peer, direct, bytes both ways, one
    // successful punch, one forwarded connection, now done.
    let one = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let hits: Vec<f64> = by_family[name]
            .iter()
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| value(&s.value).1)
            .collect();
        assert_eq!(hits.len(), 1, "{name} {labels:?}: {hits:?}");
        hits[0]
    };
    let doc = alice.status.snapshot();
    let transport = doc.peers[0].transport.unwrap().as_str();
    assert_eq!(one("punchd_rendezvous_connected", &[]), 1.0);
    assert_eq!(one("punchd_orders_refused_total", &[]), 0.0);
    // On loopback every order arrives long before its firing time.
    assert_eq!(one("punchd_orders_late_total", &[]), 0.0);
    for (path, on) in [("direct", 1.0), ("relayed", 0.0), ("none", 0.0)] {
        assert_eq!(
            one("punchd_peer_path", &[("peer", "bob"), ("path", path)]),
            on
        );
    }
    for t in ["tcp", "quic", "relay"] {
        let on = if t == transport { 1.0 } else { 0.0 };
        assert_eq!(
            one(
                "punchd_peer_transport",
                &[("peer", "bob"), ("transport", t)]
            ),
            on
        );
    }
    // Loopback IPv4 in this test: the tunnel's family says so.
    assert_eq!(doc.peers[0].family.as_deref(), Some("ipv4"));
    for (f, on) in [("ipv4", 1.0), ("ipv6", 0.0)] {
        assert_eq!(
            one("punchd_peer_family", &[("peer", "bob"), ("family", f)]),
            on
        );
    }
    let rtt = one("punchd_peer_rtt_seconds", &[("peer", "bob")]);
    assert!(rtt > 0.0 && rtt < 1.0, "rtt {rtt}");
    for d in ["in", "out"] {
        let b = one(
            "punchd_peer_bytes_total",
            &[("peer", "bob"), ("direction", d)],
        );
        assert!(b > 64.0 * 1024.0, "{d}: {b} bytes after echoing 64 KiB");
    }
    assert_eq!(one("punchd_peer_streams", &[("peer", "bob")]), 0.0);
    assert_eq!(
        one("punchd_punches_total", &[("peer", "bob"), ("result", "ok")]),
        1.0
    );
    assert_eq!(
        one(
            "punchd_punches_total",
            &[("peer", "bob"), ("result", "failed")]
        ),
        0.0
    );
    assert!(one("punchd_punch_attempts_total", &[("peer", "bob")]) >= 1.0);
    let listen = doc.forwards[0].listen.as_str();
    let fwd = [("listen", listen), ("peer", "bob"), ("service", "echo")];
    assert_eq!(one("punchd_forward_active", &fwd), 0.0);
    assert_eq!(one("punchd_forward_connections_total", &fwd), 1.0);
    assert_eq!(
        one("punchd_quic_connections", &[]),
        doc.quic_connections.unwrap() as f64
    );
    lab.stop(vec![alice, bob]).await;
}

/// `GET /v1/status` as raw JSON: every field of DESIGN.md's example, with
/// its JSON type, and `path`/`transport` from the documented sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_status_has_every_documented_field_with_its_type() {
    let lab = Lab::new().await;
    let (alice, bob) = after_traffic(&lab).await;
    let v: Json = serde_json::from_str(&http_get(alice.admin_addr, "/v1/status").await).unwrap();
    let string = |v: &Json, k: &str| -> String {
        v.get(k)
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("{k} is not a string in {v}"))
            .to_owned()
    };
    let integer = |v: &Json, k: &str| -> u64 {
        v.get(k)
            .and_then(Json::as_u64)
            .unwrap_or_else(|| panic!("{k} is not an integer ≥ 0 in {v}"))
    };
    assert_eq!(string(&v, "name"), "alice");
    assert!(string(&v, "public_addr")
        .parse::<std::net::SocketAddr>()
        .is_ok());
    assert_eq!(string(&v, "rendezvous"), "connected");
    // DESIGN.md, "Port mapping": the object is always there; on loopback
    // no gateway lies between the daemon and the rendezvous, so it is all
    // null (and nothing was probed).
    let pm = &v["port_mapping"];
    for k in [
        "protocol",
        "external_tcp",
        "external_udp",
        "expires_unix_ms",
    ] {
        assert!(
            pm.get(k).is_some_and(Json::is_null),
            "port_mapping.{k} in {v}"
        );
    }
    let peers = v["peers"].as_array().expect("peers is an array");
    assert_eq!(peers.len(), 1);
    let p = &peers[0];
    assert_eq!(string(p, "name"), "bob");
    assert!(["direct", "relayed", "none"].contains(&string(p, "path").as_str()));
    assert_eq!(string(p, "path"), "direct");
    assert!(["tcp", "quic", "relay"].contains(&string(p, "transport").as_str()));
    assert!(string(p, "remote_addr")
        .parse::<std::net::SocketAddr>()
        .is_ok());
    assert!(
        p["rtt_ms"].as_f64().is_some_and(|r| r >= 0.0),
        "rtt_ms in {p}"
    );
    assert!(integer(p, "bytes_in") > 64 * 1024);
    assert!(integer(p, "bytes_out") > 64 * 1024);
    assert_eq!(p["streams"].as_i64(), Some(0), "streams in {p}");
    let last = &p["last_punch"];
    assert_eq!(string(last, "result"), "ok");
    integer(last, "elapsed_ms");
    assert!(integer(last, "attempts") >= 1);
    assert!(
        last.get("reason").is_some_and(Json::is_null),
        "reason in {last}"
    );
    let forwards = v["forwards"].as_array().expect("forwards is an array");
    assert_eq!(forwards.len(), 1);
    let f = &forwards[0];
    assert_eq!(
        string(f, "listen").parse::<std::net::SocketAddr>().unwrap(),
        alice.forward_addrs[0]
    );
    assert_eq!(string(f, "peer"), "bob");
    assert_eq!(string(f, "service"), "echo");
    assert_eq!(f["active"].as_i64(), Some(0), "active in {f}");
    lab.stop(vec![alice, bob]).await;
}

fn punchd_status(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_punchd"))
        .arg("status")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "punchd status {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The table row of `peer` and the forward's row, from `punchd status`.
fn check_table(table: &str, alice: &RunningDaemon) {
    let doc = alice.status.snapshot();
    let p = &doc.peers[0];
    let row = table
        .lines()
        .find(|l| l.starts_with("bob "))
        .unwrap_or_else(|| panic!("no row for bob:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "direct", "{row}");
    assert_eq!(cols[2], p.transport.unwrap().as_str(), "{row}");
    assert_eq!(Some(cols[3]), p.remote_addr.as_deref(), "{row}");
    assert!(
        cols[4].ends_with("ms") && cols[4].trim_end_matches("ms").parse::<f64>().is_ok(),
        "RTT in {row}"
    );
    // IN and OUT, human-readable (64 KiB echoed: at least KiB).
    assert!(row.contains("KiB") || row.contains("MiB"), "bytes in {row}");
    assert!(row.contains("ok in"), "last punch in {row}");
    let listen = alice.forward_addrs[0].to_string();
    let fwd = table
        .lines()
        .find(|l| l.starts_with(&listen))
        .unwrap_or_else(|| panic!("no forward row for {listen}:\n{table}"));
    let cols: Vec<&str> = fwd.split_whitespace().collect();
    assert_eq!(cols, [listen.as_str(), "bob", "echo", "0", "1"], "{fwd}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn punchd_status_prints_the_table_by_admin_address_and_by_config() {
    let lab = Lab::new().await;
    let (alice, bob) = after_traffic(&lab).await;
    let admin = alice.admin_addr.to_string();
    let table = punchd_status(&["--admin", &admin]);
    check_table(&table, &alice);
    assert!(table.starts_with("alice "), "{table}");
    // --config finds the admin address in peer.toml.
    let dir = std::env::temp_dir().join(format!("punchd-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("peer.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"{}\"\n\
             [admin]\nlisten = \"{admin}\"\n",
            lab.rendezvous.url()
        ),
    )
    .unwrap();
    let by_config = punchd_status(&["--config", cfg.to_str().unwrap()]);
    check_table(&by_config, &alice);
    // And --json is the status document.
    let json: punchd::StatusDoc =
        serde_json::from_str(&punchd_status(&["--admin", &admin, "--json"])).unwrap();
    assert_eq!(json.peers[0].name, "bob");
    std::fs::remove_dir_all(&dir).unwrap();
    lab.stop(vec![alice, bob]).await;
}
