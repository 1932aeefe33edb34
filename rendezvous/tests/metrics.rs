//! `/metrics` of the real server, read with a real Prometheus text-format
//! parser (`prometheus-parse`) after real activity: every family
//! `src/server/metrics.rs` documents is there with its type, HELP and
//! labels, and nothing else is; and `/healthz` answers 200.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use futures::SinkExt;
use prometheus_parse::{Scrape, Value};
use punch_config::RendezvousConfig;
use punch_rendezvous::datagram::{self, ProbeBody};
use punch_rendezvous::protocol::{ClientMsg, ErrorCode, PathKind, PunchResult};
use tokio_tungstenite::tungstenite::Message;

use support::{
    hello, hello_udp, key, probe, punch, recv_binary, relay, relay_refusal, round_trip, send,
    TestServer,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
}

/// A label and the values it takes.
type Label = (&'static str, Vec<&'static str>);

/// The documented families: name, type, and each label with its values.
fn documented() -> Vec<(&'static str, Kind, Vec<Label>)> {
    let codes = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let relay_reasons = vec![
        "unknown_session",
        "wrong_token",
        "store_unavailable",
        "daemon_cap",
        "server_cap",
        "pair_timeout",
        "replaced",
        "idle_timeout",
        "max_lifetime",
    ];
    vec![
        ("punch_rendezvous_connected_daemons", Kind::Gauge, vec![]),
        ("punch_rendezvous_connections_total", Kind::Counter, vec![]),
        (
            "punch_rendezvous_punches_coordinated_total",
            Kind::Counter,
            vec![],
        ),
        (
            "punch_rendezvous_punch_results_total",
            Kind::Counter,
            vec![("path", vec!["direct", "relayed", "none"])],
        ),
        (
            "punch_rendezvous_refusals_total",
            Kind::Counter,
            vec![("reason", codes)],
        ),
        ("punch_rendezvous_relays_active", Kind::Gauge, vec![]),
        ("punch_rendezvous_relays_total", Kind::Counter, vec![]),
        ("punch_rendezvous_relay_bytes_total", Kind::Counter, vec![]),
        ("punch_rendezvous_udp_probes_total", Kind::Counter, vec![]),
        (
            "punch_rendezvous_observe_answered_total",
            Kind::Counter,
            vec![("transport", vec!["tcp", "udp"])],
        ),
        (
            "punch_rendezvous_observe_refused_total",
            Kind::Counter,
            vec![("transport", vec!["tcp", "udp"])],
        ),
        ("punch_rendezvous_udp_dropped_total", Kind::Counter, vec![]),
        (
            "punch_rendezvous_relay_refusals_total",
            Kind::Counter,
            vec![("reason", relay_reasons)],
        ),
        ("punch_rendezvous_connections_open", Kind::Gauge, vec![]),
        (
            "punch_rendezvous_connection_refusals_total",
            Kind::Counter,
            vec![(
                "reason",
                vec!["total", "per_ip", "header_timeout", "tls_handshake"],
            )],
        ),
        (
            "punch_rendezvous_punch_refusals_total",
            Kind::Counter,
            vec![("reason", vec!["requester_cap", "server_cap", "undelivered"])],
        ),
        (
            "punch_rendezvous_local_addrs_dropped_total",
            Kind::Counter,
            vec![(
                "reason",
                vec![
                    "too_many",
                    "not_lan",
                    "loopback",
                    "link_local",
                    "multicast",
                    "unspecified",
                    "mapped_not_observed",
                ],
            )],
        ),
        (
            "punch_rendezvous_udp_drops_total",
            Kind::Counter,
            vec![(
                "reason",
                vec![
                    "malformed",
                    "unknown_name",
                    "replay",
                    "source_rate",
                    "server_rate",
                    "bad_signature",
                    "daemon_rate",
                    "stale",
                ],
            )],
        ),
    ]
}

/// Status line, headers and body of a plain HTTP/1.0 answer.
fn split_http(answer: &str) -> (&str, &str) {
    answer.split_once("\r\n\r\n").expect("headers end")
}

/// One sample's value, by family and an optional label.
fn value(scrape: &Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
    match s.value {
        Value::Counter(v) | Value::Gauge(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_parse_and_carry_every_documented_family_after_real_activity() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let addr = server.addr;

    // A registration with a signed UDP probe.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let (mut a, wa, nonce) = hello_udp(addr, "alice", &key(1), None, false, Some(udp_port)).await;
    let body = ProbeBody {
        name: "alice",
        counter: 1,
        local_port: 0,
    };
    let server_udp = server.udp_endpoint(&wa);
    assert!(
        probe(&udp, server_udp, &datagram::probe(&key(1), &nonce, &body))
            .await
            .is_some()
    );
    // A punch and its result.
    let (mut b, _) = hello(addr, "bob", &key(2), None, false).await;
    let (to_a, to_b) = punch(&mut a, &mut b, "bob").await;
    let result = PunchResult {
        session: to_a.session.clone(),
        path: PathKind::Relayed,
        elapsed_ms: 10_000,
        attempts: 40,
        reason: Some("timeout".into()),
    };
    send(&mut a, &ClientMsg::Result(result)).await;
    round_trip(&mut a, 1).await;
    // A refused relay join, then the relay itself.
    assert_eq!(relay_refusal(addr, &to_a.session, "guess").await.0, 403);
    let mut ra = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    ra.send(Message::binary(vec![1u8; 1000])).await.unwrap();
    assert_eq!(recv_binary(&mut rb).await.len(), 1000);

    let answer = server.get("/metrics").await;
    let (head, text) = split_http(&answer);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    // The parser skips what it cannot read: every sample line must have
    // become a sample.
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "unparsed lines in\n{text}"
    );

    let families = documented();
    let mut seen: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for s in &scrape.samples {
        seen.entry(s.metric.as_str()).or_default();
    }
    let names: BTreeSet<&str> = families.iter().map(|f| f.0).collect();
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        names,
        "families served vs documented"
    );
    for (name, kind, labels) in &families {
        let help = scrape
            .docs
            .get(*name)
            .map(String::as_str)
            .unwrap_or_default();
        assert!(!help.trim().is_empty(), "{name} has no HELP");
        let samples: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == *name)
            .collect();
        for s in &samples {
            let got = match s.value {
                Value::Counter(_) => Kind::Counter,
                Value::Gauge(_) => Kind::Gauge,
                ref other => panic!("{name} is {other:?}"),
            };
            assert_eq!(got, *kind, "{name}'s TYPE");
            let keys: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = labels.iter().map(|l| l.0).collect();
            assert_eq!(keys, want, "{name}'s labels");
        }
        match labels.as_slice() {
            [] => assert_eq!(samples.len(), 1, "{name}: one sample"),
            [(label, values)] => {
                let got: BTreeSet<&str> =
                    samples.iter().filter_map(|s| s.labels.get(label)).collect();
                let want: BTreeSet<&str> = values.iter().copied().collect();
                assert_eq!(got, want, "{name}'s {label} values");
                assert_eq!(
                    samples.len(),
                    values.len(),
                    "{name}: one sample per {label}"
                );
            }
            _ => unreachable!("no family has two labels"),
        }
    }

    // The activity shows.
    let v = |name, label| value(&scrape, name, label);
    assert_eq!(v("punch_rendezvous_connected_daemons", None), 2.0);
    assert_eq!(v("punch_rendezvous_connections_total", None), 2.0);
    assert_eq!(v("punch_rendezvous_punches_coordinated_total", None), 1.0);
    assert_eq!(
        v(
            "punch_rendezvous_punch_results_total",
            Some(("path", "relayed"))
        ),
        1.0
    );
    assert_eq!(
        v(
            "punch_rendezvous_refusals_total",
            Some(("reason", "relay_refused"))
        ),
        1.0
    );
    assert_eq!(
        v(
            "punch_rendezvous_relay_refusals_total",
            Some(("reason", "wrong_token"))
        ),
        1.0
    );
    assert_eq!(v("punch_rendezvous_relays_active", None), 1.0);
    assert_eq!(v("punch_rendezvous_relays_total", None), 1.0);
    assert_eq!(v("punch_rendezvous_relay_bytes_total", None), 1000.0);
    assert_eq!(v("punch_rendezvous_udp_probes_total", None), 1.0);
    assert_eq!(v("punch_rendezvous_udp_dropped_total", None), 0.0);

    let health = server.get("/healthz").await;
    let (head, body) = split_http(&health);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let health: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(health["status"], "ok", "{body}");
    assert_eq!(health["registry"], "memory", "{body}");
    drop((ra, rb));
    server.stop().await;
}
