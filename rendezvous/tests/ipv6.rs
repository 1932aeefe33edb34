//! Dual stack at the rendezvous: one listener per family (v6-only), a
//! daemon registered over IPv4 shows its IPv6 endpoint with an
//! observe-only hello, and punch orders carry both families.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use punch_config::RendezvousConfig;
use punch_rendezvous::protocol::{
    b64, decode_nonce, sign_challenge, ClientMsg, ErrorCode, Hello, ServerMsg, PROTOCOL_VERSION,
};
use punch_rendezvous::server::{bind, run_listeners, LiveConfig, Trust};
use support::{open, recv, send};
use tokio_util::sync::CancellationToken;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// An observe-only hello from `addr`'s family: the answer.
async fn observe_only(addr: SocketAddr, name: &str, key: &SigningKey) -> ServerMsg {
    let mut ws = open(addr).await;
    let ServerMsg::Challenge { nonce, .. } = recv(&mut ws).await else {
        panic!("expected challenge")
    };
    let nonce = decode_nonce(&nonce).unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        public_key: b64(key.verifying_key().as_bytes()),
        local_addrs: vec![],
        udp_port: None,
        mapped_tcp: None,
        mapped_udp: None,
        token: None,
        signature: sign_challenge(key, &nonce, name, None),
        nat: None,
        rtt_us: None,
        observe_only: true,
    };
    send(&mut ws, &ClientMsg::Hello(hello)).await;
    recv(&mut ws).await
}

#[tokio::test]
async fn a_dual_stack_server_hands_out_both_families() {
    let v4 = bind::tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = v4.local_addr().unwrap().port();
    let v6_addr: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    // Both on one port: the IPv6 socket is v6-only.
    let v6 = bind::tcp(v6_addr).expect("::1 on loopback (the lab and CI have it)");
    let v4_addr = v4.local_addr().unwrap();
    let cfg = RendezvousConfig::default();
    let trust = Trust::from_config(&cfg).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_listeners(
        vec![v4, v6],
        LiveConfig::new(cfg),
        trust,
        cancel.clone(),
    ));

    // Alice registers over IPv4, then shows her IPv6 endpoint.
    let (mut a, wa) = support::hello(v4_addr, "alice", &key(1), None, false).await;
    let ServerMsg::Welcome {
        observed_addr: a4,
        observe_only: true,
        ..
    } = wa
    else {
        panic!("alice registers, told observe-only hellos are taken: {wa:?}")
    };
    assert!(a4.is_ipv4());
    let ServerMsg::Welcome {
        observed_addr: a6, ..
    } = observe_only(v6_addr, "alice", &key(1)).await
    else {
        panic!("the observe-only hello is answered with a welcome")
    };
    assert!(a6.is_ipv6(), "{a6}");
    // Over the family she registered with, or under another key: refused.
    for (addr, k) in [(v4_addr, key(1)), (v6_addr, key(9))] {
        match observe_only(addr, "alice", &k).await {
            ServerMsg::Error { code, .. } => assert_eq!(code, ErrorCode::NotRegistered),
            other => panic!("refused, not {other:?}"),
        }
    }
    // Bob is IPv6-only.
    let (mut b, wb) = support::hello(v6_addr, "bob", &key(2), None, false).await;
    let ServerMsg::Welcome {
        observed_addr: b6, ..
    } = wb
    else {
        panic!("bob registers over IPv6: {wb:?}")
    };
    assert!(b6.is_ipv6());

    send(&mut a, &ClientMsg::Connect { peer: "bob".into() }).await;
    let (ServerMsg::Punch(pa), ServerMsg::Punch(pb)) = (recv(&mut a).await, recv(&mut b).await)
    else {
        panic!("both get punch orders")
    };
    assert_eq!(pa.candidates[0], b6, "{:?}", pa.candidates);
    assert_eq!(&pb.candidates[..2], &[a4, a6], "{:?}", pb.candidates);
    cancel.cancel();
    task.await.unwrap().unwrap();
}
