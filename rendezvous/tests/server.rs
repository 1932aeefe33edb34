//! The real server on 127.0.0.1:0 with real WebSocket clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use punch_config::{RendezvousConfig, Secret};
use punch_rendezvous::protocol::{b64, ClientMsg, ErrorCode, PathKind, PunchResult, ServerMsg};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use support::{
    error_code, expect_refused, hello, hello_udp, key, open, probe, recv, recv_binary, relay, send,
    TestServer,
};

#[tokio::test]
async fn good_signature_registers_and_reports_observed_address() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (ws, welcome) = hello(server.addr, "alice", &key(1), None, false).await;
    let ServerMsg::Welcome {
        observed_addr,
        server_time_us,
        ..
    } = welcome
    else {
        panic!("expected welcome, got {welcome:?}")
    };
    // The server saw exactly the client socket's address.
    let local = match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(observed_addr, local);
    let now = punch_rendezvous::protocol::unix_time_us();
    assert!(now.abs_diff(server_time_us) < 5_000_000);
    assert_eq!(server.metric("punch_rendezvous_connected_daemons").await, 1);
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn forged_signature_is_refused() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (_ws, answer) = hello(server.addr, "alice", &key(1), None, true).await;
    assert_eq!(error_code(&answer), ErrorCode::BadSignature);
    assert_eq!(
        server
            .metric("punch_rendezvous_refusals_total{reason=\"bad_signature\"}")
            .await,
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused_first() {
    let cfg = RendezvousConfig {
        token: Some(Secret::new("s3cret")),
        ..Default::default()
    };
    let server = TestServer::start(cfg).await;
    // Even a forged signature reports the token problem: the token is checked first.
    let (_a, answer) = hello(server.addr, "alice", &key(1), Some("wrong"), true).await;
    assert_eq!(error_code(&answer), ErrorCode::BadToken);
    let (_b, answer) = hello(server.addr, "alice", &key(1), None, false).await;
    assert_eq!(error_code(&answer), ErrorCode::BadToken);
    let (_c, answer) = hello(server.addr, "alice", &key(1), Some("s3cret"), false).await;
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    server.stop().await;
}

#[tokio::test]
async fn name_takeover_is_refused_and_same_key_replaces() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut first, w) = hello(server.addr, "alice", &key(1), None, false).await;
    assert!(matches!(w, ServerMsg::Welcome { .. }));
    let (_m, answer) = hello(server.addr, "alice", &key(2), None, false).await;
    assert_eq!(error_code(&answer), ErrorCode::NameTaken);
    // The same key from a new connection (a restarted daemon) wins.
    let (_second, w) = hello(server.addr, "alice", &key(1), None, false).await;
    assert!(matches!(w, ServerMsg::Welcome { .. }));
    expect_refused(&mut first, ErrorCode::Replaced).await;
    assert_eq!(server.metric("punch_rendezvous_connected_daemons").await, 1);
    server.stop().await;
}

/// A router-mapped endpoint on the daemon's observed IP comes first in its
/// peer's candidates, with the port the router gave; one on another IP is
/// dropped and counted, and the daemon still registers.
#[tokio::test]
async fn mapped_endpoints_lead_the_candidates_only_on_the_observed_ip() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let tcp: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let udp: SocketAddr = "127.0.0.1:40002".parse().unwrap();
    let announce = |mapped| support::Announce {
        udp_port: Some(40000),
        mapped,
        rtt_us: None,
    };
    let (mut a, wa, _) = support::hello_announcing(
        server.addr,
        "alice",
        &key(1),
        None,
        false,
        announce((Some(tcp), Some(udp))),
    )
    .await;
    assert!(matches!(wa, ServerMsg::Welcome { .. }));
    // Bob claims a mapping on an address that is not his.
    let elsewhere: SocketAddr = "203.0.113.77:40000".parse().unwrap();
    let (mut b, wb, _) = support::hello_announcing(
        server.addr,
        "bob",
        &key(2),
        None,
        false,
        announce((Some(elsewhere), Some(elsewhere))),
    )
    .await;
    let ServerMsg::Welcome {
        observed_addr: ob, ..
    } = wb
    else {
        panic!("bob registers despite the bad mapping")
    };
    send(&mut a, &ClientMsg::Connect { peer: "bob".into() }).await;
    let (ServerMsg::Punch(pa), ServerMsg::Punch(pb)) = (recv(&mut a).await, recv(&mut b).await)
    else {
        panic!("both get punch orders")
    };
    assert_eq!(pb.candidates[0], tcp, "{:?}", pb.candidates);
    assert_eq!(pb.udp_candidates[0], udp, "{:?}", pb.udp_candidates);
    assert_eq!(pa.candidates[0], ob);
    assert!(!pa.candidates.contains(&elsewhere));
    assert!(!pa.udp_candidates.contains(&elsewhere));
    assert_eq!(
        server
            .metric("punch_rendezvous_local_addrs_dropped_total{reason=\"mapped_not_observed\"}")
            .await,
        2
    );
    server.stop().await;
}

/// A daemon that has not pinged yet is timed by the RTT its hello
/// measured: an order right after bob registers 200 ms away must leave him
/// time to receive it (about 100 ms) before `at`.
#[tokio::test]
async fn a_punch_before_any_ping_is_timed_by_the_hellos_rtt() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut a, _) = hello(server.addr, "alice", &key(1), None, false).await;
    let far = support::Announce {
        rtt_us: Some(200_000),
        ..support::Announce::default()
    };
    let (mut b, wb, _) =
        support::hello_announcing(server.addr, "bob", &key(2), None, false, far).await;
    assert!(matches!(wb, ServerMsg::Welcome { .. }));
    let before = punch_rendezvous::protocol::unix_time_us();
    send(&mut a, &ClientMsg::Connect { peer: "bob".into() }).await;
    let (ServerMsg::Punch(pa), ServerMsg::Punch(_)) = (recv(&mut a).await, recv(&mut b).await)
    else {
        panic!("both get punch orders")
    };
    // One-way 100 ms, and half as much again for jitter.
    assert!(
        pa.at_us >= before + 150_000,
        "at {} µs after the connect: bob, 100 ms away, would fire late",
        pa.at_us - before
    );
    assert!(pa.at_us <= before + 1_000_000);
    server.stop().await;
}

#[tokio::test]
async fn punch_reaches_both_sides_with_one_session_and_time() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut a, wa) = hello(server.addr, "alice", &key(1), None, false).await;
    let (mut b, wb) = hello(server.addr, "bob", &key(2), None, false).await;
    let (
        ServerMsg::Welcome {
            observed_addr: oa, ..
        },
        ServerMsg::Welcome {
            observed_addr: ob, ..
        },
    ) = (wa, wb)
    else {
        panic!("both register")
    };
    send(
        &mut b,
        &ClientMsg::Ping {
            id: 7,
            rtt_us: Some(80_000),
        },
    )
    .await;
    assert!(matches!(recv(&mut b).await, ServerMsg::Pong { id: 7, .. }));
    let before = punch_rendezvous::protocol::unix_time_us();
    send(&mut a, &ClientMsg::Connect { peer: "bob".into() }).await;
    let (ServerMsg::Punch(pa), ServerMsg::Punch(pb)) = (recv(&mut a).await, recv(&mut b).await)
    else {
        panic!("both get punch orders")
    };
    assert_eq!(pa.session, pb.session);
    assert_eq!(pa.at_us, pb.at_us);
    // Bob is 80 ms away: his order needs ~40 ms, so `at` is further out.
    assert!(
        pa.at_us >= before + 40_000,
        "at {} too soon",
        pa.at_us - before
    );
    assert!(pa.at_us <= before + 1_000_000);
    assert!(pa.initiator && !pb.initiator);
    assert_eq!((pa.peer.as_str(), pb.peer.as_str()), ("bob", "alice"));
    assert_eq!(pa.public_key, b64(key(2).verifying_key().as_bytes()));
    assert_eq!(pa.candidates[0], ob);
    assert_eq!(pb.candidates[0], oa);
    assert_eq!(pb.candidates[1], "192.0.2.10:40000".parse().unwrap());
    let result = ClientMsg::Result(PunchResult {
        session: pa.session.clone(),
        path: PathKind::Direct,
        elapsed_ms: 12,
        attempts: 1,
        reason: None,
    });
    send(&mut a, &result).await;
    send(
        &mut a,
        &ClientMsg::Ping {
            id: 8,
            rtt_us: None,
        },
    )
    .await;
    assert!(matches!(recv(&mut a).await, ServerMsg::Pong { id: 8, .. }));
    assert_eq!(
        server
            .metric("punch_rendezvous_punches_coordinated_total")
            .await,
        1
    );
    assert_eq!(
        server
            .metric("punch_rendezvous_punch_results_total{path=\"direct\"}")
            .await,
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_peer_and_self_connect_get_clear_errors() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut a, _) = hello(server.addr, "alice", &key(1), None, false).await;
    send(
        &mut a,
        &ClientMsg::Connect {
            peer: "nobody".into(),
        },
    )
    .await;
    let msg = recv(&mut a).await;
    let ServerMsg::Error { code, message } = &msg else {
        panic!("{msg:?}")
    };
    assert_eq!(*code, ErrorCode::UnknownPeer);
    assert!(message.contains("nobody"), "{message}");
    send(
        &mut a,
        &ClientMsg::Connect {
            peer: "alice".into(),
        },
    )
    .await;
    expect_refused(&mut a, ErrorCode::SelfConnect).await;
    // The connection stays usable after a refused connect.
    send(
        &mut a,
        &ClientMsg::Ping {
            id: 1,
            rtt_us: None,
        },
    )
    .await;
    assert!(matches!(recv(&mut a).await, ServerMsg::Pong { id: 1, .. }));
    server.stop().await;
}

#[tokio::test]
async fn oversize_and_malformed_frames_close_only_that_connection() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut good, _) = hello(server.addr, "good", &key(1), None, false).await;

    let (mut bad, _) = hello(server.addr, "bad", &key(2), None, false).await;
    send(
        &mut bad,
        &ClientMsg::Ping {
            id: 1,
            rtt_us: None,
        },
    )
    .await;
    let _ = recv(&mut bad).await;
    bad.send(Message::text("{not json")).await.unwrap();
    expect_refused(&mut bad, ErrorCode::Malformed).await;

    let (mut huge, _) = hello(server.addr, "huge", &key(3), None, false).await;
    let _ = huge.send(Message::text("x".repeat(1024 * 1024))).await;
    // The server drops the connection: no more answers come back.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match huge.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "oversize sender was not disconnected");

    // A client that never says hello is refused too.
    let mut mute = open(server.addr).await;
    let _challenge = recv(&mut mute).await;
    send(
        &mut mute,
        &ClientMsg::Connect {
            peer: "good".into(),
        },
    )
    .await;
    expect_refused(&mut mute, ErrorCode::NotRegistered).await;

    // Everyone else is still served.
    send(
        &mut good,
        &ClientMsg::Ping {
            id: 9,
            rtt_us: None,
        },
    )
    .await;
    assert!(matches!(
        recv(&mut good).await,
        ServerMsg::Pong { id: 9, .. }
    ));
    assert!(
        server
            .metric("punch_rendezvous_refusals_total{reason=\"malformed\"}")
            .await
            >= 1
    );
    assert!(server.get("/healthz").await.contains("200 OK"));
    server.stop().await;
}

#[tokio::test]
async fn message_floods_are_rate_limited() {
    let mut cfg = RendezvousConfig::default();
    cfg.limits.messages_per_second = 5;
    cfg.limits.message_burst = 5;
    let server = TestServer::start(cfg).await;
    let (mut a, _) = hello(server.addr, "alice", &key(1), None, false).await;
    for id in 0..50 {
        if a.send(Message::text(
            serde_json::to_string(&ClientMsg::Ping { id, rtt_us: None }).unwrap(),
        ))
        .await
        .is_err()
        {
            break;
        }
    }
    let mut refused = false;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), a.next()).await {
        if let Message::Text(t) = msg {
            if let ServerMsg::Error { code, .. } = serde_json::from_str(t.as_str()).unwrap() {
                assert_eq!(code, ErrorCode::RateLimited);
                refused = true;
            }
        }
    }
    assert!(refused, "a flood must be refused");
    assert_eq!(
        server
            .metric("punch_rendezvous_refusals_total{reason=\"rate_limited\"}")
            .await,
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_tells_daemons_and_returns() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut a, _) = hello(server.addr, "alice", &key(1), None, false).await;
    server.cancel.cancel();
    expect_refused(&mut a, ErrorCode::ShuttingDown).await;
    tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_side_leaving_during_a_punch_aborts_it_for_the_other() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut a, _) = hello(server.addr, "alice", &key(1), None, false).await;
    let (mut b, _) = hello(server.addr, "bob", &key(2), None, false).await;
    send(&mut a, &ClientMsg::Connect { peer: "bob".into() }).await;
    let ServerMsg::Punch(order) = recv(&mut a).await else {
        panic!("punch order")
    };
    let _ = recv(&mut b).await;
    drop(b);
    match recv(&mut a).await {
        ServerMsg::PunchAborted { session, peer } => {
            assert_eq!(session, order.session);
            assert_eq!(peer, "bob");
        }
        other => panic!("expected punch_aborted, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn signed_udp_probes_reveal_the_udp_endpoint_and_reach_punch_orders() {
    use punch_rendezvous::datagram::{self, Datagram, ProbeBody};
    let body = |name, counter| ProbeBody {
        name,
        counter,
        local_port: 0,
    };
    let server = TestServer::start(RendezvousConfig::default()).await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_local = udp.local_addr().unwrap();
    let (mut a, wa, nonce) = hello_udp(
        server.addr,
        "alice",
        &key(1),
        None,
        false,
        Some(udp_local.port()),
    )
    .await;
    let server_udp = server.udp_endpoint(&wa);

    // A good probe is acknowledged with the address the server saw.
    let ack = probe(
        &udp,
        server_udp,
        &datagram::probe(&key(1), &nonce, &body("alice", 1)),
    )
    .await
    .expect("a signed probe is acknowledged");
    assert_eq!(
        datagram::parse(&ack),
        Some(Datagram::Ack {
            counter: 1,
            observed: udp_local
        })
    );
    // Replayed, forged (other key), bound to another registration's nonce,
    // for an unknown name, or garbage: no answer, counted as dropped.
    let bad = [
        datagram::probe(&key(1), &nonce, &body("alice", 1)),
        datagram::probe(&key(9), &nonce, &body("alice", 2)),
        datagram::probe(&key(1), &[0u8; 32], &body("alice", 3)),
        datagram::probe(&key(1), &nonce, &body("nobody", 4)),
        b"GET / HTTP/1.0".to_vec(),
    ];
    for d in &bad {
        assert_eq!(probe(&udp, server_udp, d).await, None, "{d:?} answered");
    }
    assert_eq!(server.metric("punch_rendezvous_udp_dropped_total").await, 5);
    assert_eq!(server.metric("punch_rendezvous_udp_probes_total").await, 1);
    // A daemon that re-binds its UDP socket says so in the probe.
    let moved = ProbeBody {
        local_port: 41234,
        ..body("alice", 6)
    };
    assert!(
        probe(&udp, server_udp, &datagram::probe(&key(1), &nonce, &moved))
            .await
            .is_some()
    );

    // The peer's punch order carries alice's UDP endpoint first, then her
    // local address with her UDP port; alice's order has no UDP candidates
    // for bob, who never probed.
    let (mut b, _) = hello(server.addr, "bob", &key(2), None, false).await;
    send(
        &mut b,
        &ClientMsg::Connect {
            peer: "alice".into(),
        },
    )
    .await;
    let (ServerMsg::Punch(pa), ServerMsg::Punch(pb)) = (recv(&mut a).await, recv(&mut b).await)
    else {
        panic!("both get punch orders")
    };
    let local: SocketAddr = "192.0.2.10:41234".parse().unwrap();
    assert_eq!(pb.udp_candidates, vec![udp_local, local]);
    assert!(pa.udp_candidates.is_empty());
    drop((a, b));
    server.stop().await;
}

#[tokio::test]
async fn forged_probes_naming_one_daemon_do_not_stop_anothers() {
    use punch_rendezvous::datagram::{self, ProbeBody};
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (_a, wa, _) = hello_udp(server.addr, "alice", &key(1), None, false, Some(1)).await;
    let (_b, _, bob_nonce) = hello_udp(server.addr, "bob", &key(2), None, false, Some(1)).await;
    let server_udp = server.udp_endpoint(&wa);
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for counter in 1..=200 {
        let forged = ProbeBody {
            name: "alice",
            counter,
            local_port: 0,
        };
        let d = datagram::probe(&key(9), &[0u8; 32], &forged);
        attacker.send_to(&d, server_udp).await.unwrap();
    }
    let bob_sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let body = ProbeBody {
        name: "bob",
        counter: 1,
        local_port: 0,
    };
    assert!(
        probe(
            &bob_sock,
            server_udp,
            &datagram::probe(&key(2), &bob_nonce, &body)
        )
        .await
        .is_some(),
        "bob's probe went unanswered during a flood naming alice"
    );
    assert_eq!(
        server.metric("punch_rendezvous_udp_dropped_total").await,
        200
    );
    server.stop().await;
}

#[tokio::test]
async fn relay_admits_only_the_two_sides_and_carries_their_bytes() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let (mut a, _) = hello(server.addr, "alice", &key(1), None, false).await;
    let (mut b, _) = hello(server.addr, "bob", &key(2), None, false).await;
    send(&mut a, &ClientMsg::Connect { peer: "bob".into() }).await;
    let (ServerMsg::Punch(to_a), ServerMsg::Punch(to_b)) = (recv(&mut a).await, recv(&mut b).await)
    else {
        panic!("punch orders")
    };
    let addr = server.addr;
    assert_eq!(relay(addr, &to_a.session, "guess").await.err(), Some(403));
    assert_eq!(
        relay(addr, "nosuch", &to_a.relay_token).await.err(),
        Some(404)
    );
    let mut ra = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    ra.send(Message::binary(b"ciphertext".to_vec()))
        .await
        .unwrap();
    assert_eq!(recv_binary(&mut rb).await, b"ciphertext");
    rb.send(Message::binary(b"reply".to_vec())).await.unwrap();
    assert_eq!(recv_binary(&mut ra).await, b"reply");
    assert_eq!(server.metric("punch_rendezvous_relays_total").await, 1);
    // Paired, the session is spent: a third socket is not let in.
    assert_eq!(
        relay(addr, &to_a.session, &to_a.relay_token).await.err(),
        Some(404)
    );
    server.stop().await;
}
