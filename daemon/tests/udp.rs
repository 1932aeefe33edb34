//! UDP forwarding between two real daemons on 127.0.0.1: datagrams both
//! ways through a `protocol = "udp"` forward over each direct transport,
//! one flow per client address, datagrams larger than a QUIC datagram,
//! the counters in status, and the ACL (a service exposed over TCP, or not
//! to us, is refused).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use punch_config::{PeerConfig, Protocol};
use punchd::demo::loopback::{peer_config, ExposeSpec};
use punchd::RunningDaemon;
use support::{direct, wait_for, Lab};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// A UDP echo service on 127.0.0.1:0.
async fn udp_echo(cancel: CancellationToken) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = s.recv_from(&mut buf) => if let Ok((n, from)) = r {
                    let _ = s.send_to(&buf[..n], from).await;
                },
            }
        }
    });
    addr
}

fn with_udp(mut cfg: PeerConfig, udp_services: &[&str]) -> PeerConfig {
    for e in &mut cfg.expose {
        if udp_services.contains(&e.name.as_str()) {
            e.protocol = Protocol::Udp;
        }
    }
    for f in &mut cfg.forward {
        f.protocol = Protocol::Udp;
    }
    cfg
}

/// bob exposes `exposes` (those named in `udp` over UDP); alice forwards
/// `services` over UDP; both with `punch`. Returns once direct.
async fn pair(
    lab: &Lab,
    services: &[&str],
    exposes: &[ExposeSpec],
    udp: &[&str],
    punch: &str,
) -> (RunningDaemon, RunningDaemon) {
    let bob_cfg = peer_config(
        "bob",
        &lab.rendezvous.url(),
        &[("alice", lab.alice_id.public_key())],
        exposes,
        &[],
        punch,
    )
    .unwrap();
    let bob = punchd::start(
        with_udp(bob_cfg, udp),
        lab.bob_id.clone(),
        lab.cancel.child_token(),
    )
    .await
    .unwrap();
    let forwards: Vec<_> = services.iter().map(|s| ("bob", *s)).collect();
    let alice_cfg = peer_config(
        "alice",
        &lab.rendezvous.url(),
        &[("bob", lab.bob_id.public_key())],
        &[],
        &forwards,
        punch,
    )
    .unwrap();
    let alice = punchd::start(
        with_udp(alice_cfg, &[]),
        lab.alice_id.clone(),
        lab.cancel.child_token(),
    )
    .await
    .unwrap();
    wait_for("a direct path", Duration::from_secs(60), || {
        Some(alice.status.snapshot()).filter(direct)
    })
    .await;
    (alice, bob)
}

/// Sends `datagram` to `to` and waits for its echo.
async fn echo(s: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    s.send_to(datagram, to).await.unwrap();
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, to, "the reply comes from the forward's address");
            Some(buf[..n].to_vec())
        }
        _ => None,
    }
}

async fn datagrams_over(transport: &str) {
    let lab = Lab::new().await;
    let target = udp_echo(lab.cancel.clone()).await;
    let exposes = [lab.expose_at("echo", target, &["alice"])];
    let (alice, bob) = pair(
        &lab,
        &["echo"],
        &exposes,
        &["echo"],
        &format!("transports = [\"{transport}\"]"),
    )
    .await;
    let fwd = alice.forward_addrs[0];
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    // Sizes: empty, small, about a QUIC datagram, and well over it (so the
    // QUIC path must fall back to the flow's stream), and the largest.
    let sizes = [0usize, 1, 64, 1100, 1400, 9000, 65_000];
    let mut sent = 0u64;
    for round in 0..20u8 {
        for (i, size) in sizes.iter().enumerate() {
            for s in [&a, &b] {
                let d: Vec<u8> = (0..*size).map(|k| (k as u8) ^ round ^ i as u8).collect();
                let got = echo(s, fwd, &d).await;
                assert_eq!(
                    got.as_deref(),
                    Some(&d[..]),
                    "{transport}: {size} bytes, round {round}"
                );
                sent += 1;
            }
        }
    }
    // The client can read a reply a moment before its count lands.
    let doc = wait_for("the counters", Duration::from_secs(5), || {
        Some(alice.status.snapshot()).filter(|d| d.forwards[0].datagrams_in == sent)
    })
    .await;
    let f = &doc.forwards[0];
    assert_eq!(f.protocol, "udp");
    assert_eq!(f.active, 2, "one flow per client address: {f:?}");
    assert_eq!(f.total, 2, "{f:?}");
    assert_eq!(f.datagrams_out, sent, "{f:?}");
    assert_eq!(f.datagrams_in, sent, "{f:?}");
    assert_eq!(f.datagrams_dropped, 0, "{f:?}");
    assert_eq!(doc.peers[0].transport.map(|t| t.as_str()), Some(transport));
    // Each flow is a stream on both sides while it lives.
    assert_eq!(doc.peers[0].streams, 2, "{:?}", doc.peers[0]);
    let metrics = support::http_get(alice.admin_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("punchd_forward_datagrams_out_total{")
                && l.ends_with(&format!(" {sent}"))),
        "{metrics}"
    );
    println!("{transport}: {sent} datagrams each way, 2 flows");
    lab.stop(vec![alice, bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_cross_a_tcp_tunnel_both_ways() {
    datagrams_over("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_cross_a_quic_tunnel_both_ways() {
    datagrams_over("quic").await;
}

/// A UDP forward reaches only a service exposed over UDP to this peer:
/// one exposed over TCP, one exposed to someone else and one not exposed
/// are refused, and their datagrams counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_and_the_protocol_are_checked() {
    let lab = Lab::new().await;
    let target = udp_echo(lab.cancel.clone()).await;
    let exposes = [
        lab.expose_at("tcp-only", target, &["alice"]),
        lab.expose_at("not-alice", target, &[]),
        lab.expose_at("echo", target, &["alice"]),
    ];
    let (alice, bob) = pair(
        &lab,
        &["tcp-only", "not-alice", "missing", "echo"],
        &exposes,
        &["not-alice", "echo"],
        "transports = [\"tcp\"]",
    )
    .await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (i, addr) in alice.forward_addrs[..3].iter().enumerate() {
        s.send_to(b"let me in", addr).await.unwrap();
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_millis(800), s.recv_from(&mut buf)).await;
        assert!(r.is_err(), "forward {i} was answered");
    }
    // The allowed one works on the same tunnel.
    assert_eq!(
        echo(&s, alice.forward_addrs[3], b"hello").await.as_deref(),
        Some(&b"hello"[..])
    );
    let dropped = wait_for("the refused flows to end", Duration::from_secs(5), || {
        let doc = alice.status.snapshot();
        let d: Vec<u64> = doc.forwards[..3]
            .iter()
            .map(|f| f.datagrams_dropped)
            .collect();
        d.iter().all(|n| *n == 1).then_some(d)
    })
    .await;
    assert_eq!(dropped, vec![1, 1, 1]);
    lab.stop(vec![alice, bob]).await;
}
