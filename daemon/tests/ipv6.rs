//! Two daemons and a rendezvous on `::1`: registration, candidates and a
//! direct tunnel over IPv6, by TCP and by QUIC (the dual-stack UDP punch
//! socket), with the family in status and /metrics.
//! (Dual stack across sites, firewalls and happy eyeballs between
//! families are lab matters; see lab/README.md.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use punch_config::RendezvousConfig;
use punchd::demo::echo_roundtrip;
use punchd::demo::loopback::{echo_server, peer_config, ExposeSpec, Rendezvous};
use punchd::{pattern, Identity};
use support::{direct, wait_for};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_rendezvous_gives_a_direct_tunnel_over_ipv6() {
    direct_over_ipv6("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quic_punch_runs_over_ipv6_too() {
    direct_over_ipv6("quic").await;
}

/// Both daemons on `::1` with only `transport` allowed: direct over IPv6
/// on it, bob reached at his punch port, family `ipv6`, 256 KiB echoed.
async fn direct_over_ipv6(transport: &str) {
    let rv = Rendezvous::start_on("[::1]:0", RendezvousConfig::default())
        .await
        .expect("::1 on loopback (CI and the lab have it)");
    let url = rv.url();
    assert!(url.starts_with("http://[::1]:"), "{url}");
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let echo = echo_server(cancel.clone(), &tracker).await.unwrap();
    let (alice_id, bob_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let expose = ExposeSpec {
        name: "echo".into(),
        target: echo.to_string(),
        allow: vec!["alice".into()],
    };
    // A rendezvous on loopback: the daemons offer no other address of this
    // host (some have unique-local or global ones), so `::1` it is.
    let punch = format!("transports = [\"{transport}\"]");
    let punch = punch.as_str();
    let bob_cfg = peer_config(
        "bob",
        &url,
        &[("alice", alice_id.public_key())],
        &[expose],
        &[],
        punch,
    )
    .unwrap();
    let bob = punchd::start(bob_cfg, bob_id.clone(), cancel.child_token())
        .await
        .unwrap();
    let alice_cfg = peer_config(
        "alice",
        &url,
        &[("bob", bob_id.public_key())],
        &[],
        &[("bob", "echo")],
        punch,
    )
    .unwrap();
    let alice = punchd::start(alice_cfg, alice_id, cancel.child_token())
        .await
        .unwrap();

    let doc = wait_for("a direct path over IPv6", Duration::from_secs(20), || {
        Some(alice.status.snapshot()).filter(direct)
    })
    .await;
    let bob_port = bob.status.snapshot().punch_port;
    let peer = &doc.peers[0];
    let remote = peer.remote_addr.as_deref().unwrap_or_default();
    if transport == "tcp" {
        assert_eq!(
            remote,
            format!("[::1]:{bob_port}"),
            "bob's punch port over IPv6"
        );
    } else {
        // The UDP punch socket took its own free port here (port 0).
        assert!(
            remote.starts_with("[::1]:"),
            "bob's QUIC socket over IPv6: {remote}"
        );
    }
    assert_eq!(peer.family.as_deref(), Some("ipv6"));
    assert_eq!(peer.transport.map(|t| t.as_str()), Some(transport));
    let own = doc.public_addr6.as_deref().expect("public_addr6 is set");
    assert!(own.starts_with("[::1]:"), "{own}");
    let punch = peer.last_punch.clone().unwrap();
    println!(
        "ipv6 loopback: direct in {} ms, {} attempts, family {:?}, transport {:?}",
        punch.elapsed_ms, punch.attempts, peer.family, peer.transport
    );
    let data = pattern(256 * 1024, 6);
    let stream = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    echo_roundtrip(stream, &data).await.unwrap();
    let metrics = support::http_get(alice.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("punchd_peer_family{peer=\"bob\",family=\"ipv6\"} 1"),
        "{metrics}"
    );

    for d in [alice, bob] {
        d.shutdown(Duration::from_secs(3)).await;
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    rv.stop().await;
}
