//! NAT discovery on loopback: `punchd netcheck` (no daemon), the
//! rendezvous's observe endpoints, and status's `nat`. Loopback has no
//! NAT, so every mapping is endpoint-independent with ports preserved;
//! the lab (`lab/tests/netcheck.rs`) checks real NATs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use punch_config::RendezvousConfig;
use punch_rendezvous::datagram::{self, Datagram};
use punchd::demo::loopback::Rendezvous;
use punchd::identity::Identity;

mod support;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("punchd-netcheck-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_config(dir: &Path, url: &str) -> PathBuf {
    let key = dir.join("alice.key");
    Identity::generate().unwrap().save_new(&key).unwrap();
    let cfg = dir.join("alice.toml");
    let text = format!(
        "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"{url}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n"
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn netcheck(cfg: &Path, json: bool) -> (bool, String, String) {
    let mut args = vec!["netcheck", "--config", cfg.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_punchd"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcheck_reports_both_transports_without_a_daemon() {
    let dir = temp_dir("cli");
    // The harness binds NAT discovery's second endpoint on a port it
    // holds (TCP and UDP), so no other test can take it first.
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let cfg = write_config(&dir, &rv.url());
    let c = cfg.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || netcheck(&c, true))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["mapping_tcp"], "endpoint-independent", "{doc}");
    assert_eq!(doc["mapping_udp"], "endpoint-independent", "{doc}");
    assert_eq!(doc["port_preserved_tcp"], true, "{doc}");
    assert_eq!(doc["port_preserved_udp"], true, "{doc}");
    assert!(doc["port_mapping"].as_array().unwrap().is_empty(), "{doc}");
    assert_eq!(doc["public_ip"], "127.0.0.1");
    // Two local ports, each seen by both endpoints.
    assert_eq!(doc["observed_tcp"].as_array().unwrap().len(), 2, "{doc}");
    assert_eq!(doc["observed_udp"].as_array().unwrap().len(), 2, "{doc}");
    // The server's unsolicited SYN reached our own (connected, not
    // listening) port on loopback: refused.
    assert_eq!(doc["unsolicited_tcp"], "rst", "{doc}");
    let (ok, human, err) = tokio::task::spawn_blocking(move || netcheck(&cfg, false))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        human.contains("TCP mapping: endpoint-independent, port preserved"),
        "{human}"
    );
    assert!(
        human.contains("UDP mapping: endpoint-independent"),
        "{human}"
    );
    assert!(
        human.contains("unsolicited SYN: answered with RST"),
        "{human}"
    );
    rv.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_second_endpoint_the_mapping_is_unknown_and_no_rendezvous_is_an_error() {
    let dir = temp_dir("unknown");
    let rv = Rendezvous::start(RendezvousConfig {
        observe_port: Some(0),
        ..RendezvousConfig::default()
    })
    .await
    .unwrap();
    let cfg = write_config(&dir, &rv.url());
    let c = cfg.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || netcheck(&c, true))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["mapping_tcp"], "unknown", "{doc}");
    assert_eq!(doc["mapping_udp"], "unknown", "{doc}");
    assert_eq!(doc["unsolicited_tcp"], serde_json::Value::Null, "{doc}");
    rv.stop().await;
    // Nothing listening: exit 1 with the reason.
    let (ok, _, err) = tokio::task::spawn_blocking(move || netcheck(&cfg, true))
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("/v1/observe"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observe_endpoints_answer_the_source_and_never_amplify() {
    // The harness binds NAT discovery's second endpoint on a port it
    // holds (TCP and UDP), so no other test can take it first.
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let mut buf = [0u8; 512];
    let observe = rv.observe_port.expect("the second endpoint is bound");
    for port in [rv.addr.port(), observe] {
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let q = datagram::observe(42);
        sock.send_to(&q, to).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer within 2 s from UDP port {port} (listen port {}, observe port {observe})", rv.addr.port()))
            .unwrap();
        assert!(n <= q.len());
        assert_eq!(
            datagram::parse(&buf[..n]),
            Some(Datagram::Observed {
                nonce: 42,
                observed: me
            })
        );
        // A short question is not answered.
        sock.send_to(&q[..20], to).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
                .await
                .is_err()
        );
    }
    // TCP: one line, then close.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", observe))
        .await
        .unwrap();
    let me = s.local_addr().unwrap();
    let mut line = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim().parse::<SocketAddr>().unwrap(), me);
    // Metrics count the answers.
    let metrics = punchd_http_get(rv.addr, "/metrics").await;
    assert!(
        metrics.contains("punch_rendezvous_observe_answered_total{transport=\"udp\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("punch_rendezvous_observe_answered_total{transport=\"tcp\"} 1"),
        "{metrics}"
    );
    rv.stop().await;
}

async fn punchd_http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_shows_its_nat_in_status_and_metrics() {
    let lab = support::Lab::new().await;
    let alice = lab.alice(&[], "").await;
    let doc = support::wait_for("nat in status", Duration::from_secs(10), || {
        alice.status.snapshot().nat
    })
    .await;
    assert_eq!(doc.mapping_tcp, "endpoint-independent", "{doc:?}");
    assert_eq!(doc.mapping_udp, "endpoint-independent", "{doc:?}");
    let json = serde_json::to_value(alice.status.snapshot()).unwrap();
    assert_eq!(json["nat"]["mapping_tcp"], "endpoint-independent");
    let metrics = alice.status.render_metrics();
    assert!(
        metrics
            .contains("punchd_nat_mapping{transport=\"tcp\",mapping=\"endpoint-independent\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("punchd_nat_checks_total 1"), "{metrics}");
    lab.stop(vec![alice]).await;
}
