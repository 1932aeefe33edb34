//! The fallback relay against the real server: who may join, the caps
//! (each side of a paired session holds its slot), the byte budget and
//! what it charges, and the same side joining twice. The pairing timeout
//! (30 s) is unit-tested with paused time in `src/server/relay.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use punch_config::RendezvousConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use support::{hello, key, punch, recv_binary, relay, relay_refusal, TestServer, Ws};

/// Joins the relay once a slot is free: retries a cap refusal (429 or
/// 503) every 20 ms for up to 10 s, since a slot comes back when the
/// relay holding it has finished on its own task.
async fn relay_when_free(
    addr: std::net::SocketAddr,
    session: &str,
    token: &str,
    refused_with: u16,
) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match relay(addr, session, token).await {
            Ok(ws) => return ws,
            Err(status) => assert_eq!(status, refused_with),
        }
        assert!(Instant::now() < deadline, "no relay slot came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Both directions carry a frame.
async fn carries_bytes(x: &mut Ws, y: &mut Ws) {
    x.send(Message::binary(b"ping".to_vec())).await.unwrap();
    assert_eq!(recv_binary(y).await, b"ping");
    y.send(Message::binary(b"pong".to_vec())).await.unwrap();
    assert_eq!(recv_binary(x).await, b"pong");
}

/// The next close frame (code and reason) on `ws`, skipping data.
async fn close_of(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("close in time")
            .expect("a close frame before the end")
            .expect("no error");
        if let Message::Close(frame) = msg {
            let frame = frame.expect("a close frame with a reason");
            return (frame.code, frame.reason.to_string());
        }
    }
}

async fn relay_refusals(server: &TestServer, reason: &str) -> u64 {
    server
        .metric(&format!(
            "punch_rendezvous_relay_refusals_total{{reason=\"{reason}\"}}"
        ))
        .await
}

#[tokio::test]
async fn relay_refuses_a_wrong_token_and_another_sessions_token() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let addr = server.addr;
    let (mut a, _) = hello(addr, "alice", &key(1), None, false).await;
    let (mut b, _) = hello(addr, "bob", &key(2), None, false).await;
    let (mut c, _) = hello(addr, "carol", &key(3), None, false).await;
    let (to_a, to_b) = punch(&mut a, &mut b, "bob").await;
    let (to_a2, to_c) = punch(&mut a, &mut c, "carol").await;

    let (status, body) = relay_refusal(addr, &to_a.session, "guess").await;
    assert_eq!(status, 403);
    assert!(body.contains("wrong relay token"), "{body}");
    // Tokens of another session, even one alice is a side of, open only
    // that session.
    for token in [&to_a2.relay_token, &to_c.relay_token] {
        assert_eq!(relay_refusal(addr, &to_a.session, token).await.0, 403);
    }
    assert_eq!(relay_refusals(&server, "wrong_token").await, 3);
    assert_eq!(
        server
            .metric("punch_rendezvous_refusals_total{reason=\"relay_refused\"}")
            .await,
        3
    );

    // The session still works for its two sides.
    let mut ra = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    carries_bytes(&mut ra, &mut rb).await;
    server.stop().await;
}

/// A server on `cfg` with alice, bob, carol and dave registered.
async fn four_daemons(cfg: RendezvousConfig) -> (TestServer, [Ws; 4]) {
    let server = TestServer::start(cfg).await;
    let mut daemons = Vec::new();
    for (seed, name) in (1..).zip(["alice", "bob", "carol", "dave"]) {
        daemons.push(hello(server.addr, name, &key(seed), None, false).await.0);
    }
    let Ok(daemons) = daemons.try_into() else {
        unreachable!("four names, four daemons")
    };
    (server, daemons)
}

#[tokio::test]
async fn the_per_daemon_cap_counts_both_sides_of_a_relay() {
    let mut cfg = RendezvousConfig::default();
    cfg.limits.max_relays_per_daemon = 1;
    let (server, [mut a, mut b, mut c, mut d]) = four_daemons(cfg).await;
    let addr = server.addr;
    let (to_a, to_b) = punch(&mut a, &mut b, "bob").await;
    let (to_c, to_b2) = punch(&mut c, &mut b, "bob").await;
    let (to_d, to_a2) = punch(&mut d, &mut a, "alice").await;

    // Alice waits first, bob pairs second: each holds its one relay.
    let mut ra = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    carries_bytes(&mut ra, &mut rb).await;
    for (session, token) in [
        (&to_b2.session, &to_b2.relay_token),
        (&to_a2.session, &to_a2.relay_token),
    ] {
        let (status, body) = relay_refusal(addr, session, token).await;
        assert_eq!(status, 429, "{body}");
        assert!(
            body.contains("for this daemon (1 relays at once)"),
            "{body}"
        );
    }
    assert_eq!(relay_refusals(&server, "daemon_cap").await, 2);
    // Others are not held to alice's and bob's share.
    let rc = relay(addr, &to_c.session, &to_c.relay_token).await.unwrap();
    let rd = relay(addr, &to_d.session, &to_d.relay_token).await.unwrap();

    // When the relay ends, both slots come back.
    drop((ra, rb));
    let mut rb2 = relay_when_free(addr, &to_b2.session, &to_b2.relay_token, 429).await;
    let mut ra2 = relay_when_free(addr, &to_a2.session, &to_a2.relay_token, 429).await;
    let (mut rc, mut rd) = (rc, rd);
    carries_bytes(&mut rc, &mut rb2).await;
    carries_bytes(&mut rd, &mut ra2).await;
    server.stop().await;
}

#[tokio::test]
async fn the_server_cap_counts_both_sides_of_a_relay() {
    let mut cfg = RendezvousConfig::default();
    cfg.limits.max_relays = 1;
    let (server, [mut a, mut b, mut c, mut d]) = four_daemons(cfg).await;
    let addr = server.addr;
    let (to_a, to_b) = punch(&mut a, &mut b, "bob").await;
    let (to_c, to_d) = punch(&mut c, &mut d, "dave").await;

    let mut ra = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    carries_bytes(&mut ra, &mut rb).await;
    // One relay is running: the next session's first side is refused.
    let (status, body) = relay_refusal(addr, &to_c.session, &to_c.relay_token).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("relay capacity of this server reached (1 relays at once)"),
        "{body}"
    );
    assert_eq!(relay_refusals(&server, "server_cap").await, 1);

    drop((ra, rb));
    let mut rc = relay_when_free(addr, &to_c.session, &to_c.relay_token, 503).await;
    let mut rd = relay(addr, &to_d.session, &to_d.relay_token).await.unwrap();
    carries_bytes(&mut rc, &mut rd).await;
    server.stop().await;
}

/// A paired relay on a server whose relay budget is `rate` bytes per second.
async fn paired_relay(rate: u64) -> (TestServer, [Ws; 2], Ws, Ws) {
    let mut cfg = RendezvousConfig::default();
    cfg.limits.relay_bytes_per_second = rate;
    let server = TestServer::start(cfg).await;
    let addr = server.addr;
    let (mut a, _) = hello(addr, "alice", &key(1), None, false).await;
    let (mut b, _) = hello(addr, "bob", &key(2), None, false).await;
    let (to_a, to_b) = punch(&mut a, &mut b, "bob").await;
    let mut ra = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    carries_bytes(&mut ra, &mut rb).await;
    (server, [a, b], ra, rb)
}

#[tokio::test]
async fn a_relay_side_is_held_to_its_byte_rate() {
    const RATE: u64 = 100_000;
    const FRAME: usize = 10_000;
    let window = Duration::from_secs(2);
    let (server, _daemons, mut ra, mut rb) = paired_relay(RATE).await;
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        // Far more than the window allows; stops when the test drops rb.
        for _ in 0..1_000 {
            if ra.send(Message::binary(vec![7u8; FRAME])).await.is_err() {
                break;
            }
        }
        ra
    });
    let mut received = 0u64;
    let end = t0 + window;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end.into(), rb.next()).await {
        if let Message::Binary(b) = msg {
            received += b.len() as u64;
        }
    }
    // The budget: a one-second burst, then the rate, so at most
    // RATE * (1 s + window) plus the frame in flight; 10 % margin.
    let budget = RATE * (1 + window.as_secs()) + FRAME as u64;
    assert!(
        received <= budget + budget / 10,
        "{received} bytes in {window:?} at {RATE} B/s"
    );
    // A positive control: the relay did carry at least half the rate
    // over the window (loopback; any machine manages that).
    assert!(
        received >= RATE * window.as_secs() / 2,
        "only {received} bytes in {window:?}"
    );
    drop(rb);
    sender.abort();
    server.stop().await;
}

/// How long `rb` waits for the binary `marker` after `t0`; frames that are
/// not binary must not come through.
async fn marker_delay(rb: &mut Ws, t0: Instant) -> Duration {
    let msg = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match rb.next().await.expect("open").expect("no error") {
                Message::Binary(b) => return b.to_vec(),
                Message::Text(t) => panic!("a text frame came through: {} bytes", t.len()),
                _ => continue,
            }
        }
    })
    .await
    .expect("the marker in time");
    assert_eq!(msg, b"marker");
    t0.elapsed()
}

#[tokio::test]
async fn text_and_ping_frames_spend_the_relay_budget() {
    const RATE: u64 = 20_000;
    // Three seconds' worth of text: the burst pays for one, the marker
    // behind them waits about two seconds. Asserted: at least 1.5 s (a
    // slow machine only makes it later). Before text was charged, ~0 s.
    let (server, _daemons, mut ra, mut rb) = paired_relay(RATE).await;
    let t0 = Instant::now();
    for _ in 0..3 {
        ra.send(Message::text("t".repeat(RATE as usize)))
            .await
            .unwrap();
    }
    ra.send(Message::binary(b"marker".to_vec())).await.unwrap();
    let waited = marker_delay(&mut rb, t0).await;
    assert!(
        waited >= Duration::from_millis(1_500),
        "text was free: {waited:?}"
    );
    server.stop().await;

    // The same with pings (at most 125 bytes each): 480 of them are about
    // three seconds' worth, headers included.
    let (server, _daemons, mut ra, mut rb) = paired_relay(RATE).await;
    let t0 = Instant::now();
    for _ in 0..480 {
        ra.send(Message::Ping(vec![0u8; 125].into())).await.unwrap();
    }
    ra.send(Message::binary(b"marker".to_vec())).await.unwrap();
    let waited = marker_delay(&mut rb, t0).await;
    assert!(
        waited >= Duration::from_millis(1_500),
        "pings were free: {waited:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_same_side_joining_twice_keeps_one_and_closes_the_other() {
    let server = TestServer::start(RendezvousConfig::default()).await;
    let addr = server.addr;
    let (mut a, _) = hello(addr, "alice", &key(1), None, false).await;
    let (mut b, _) = hello(addr, "bob", &key(2), None, false).await;
    let (to_a, to_b) = punch(&mut a, &mut b, "bob").await;
    let first = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    let second = relay(addr, &to_a.session, &to_a.relay_token).await.unwrap();
    // Whichever reached the store later is the newer; the older is closed
    // with the reason, the newer pairs with bob. (The HTTP upgrades finish
    // before the joins run, so which one that is is not fixed here.)
    let (mut first, mut second) = (first, second);
    let (older, (code, reason)) = tokio::select! {
        c = close_of(&mut first) => (0, c),
        c = close_of(&mut second) => (1, c),
    };
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("replaced by a newer join"), "{reason}");
    assert_eq!(relay_refusals(&server, "replaced").await, 1);
    let mut newer = if older == 0 { second } else { first };
    let mut rb = relay(addr, &to_b.session, &to_b.relay_token).await.unwrap();
    carries_bytes(&mut newer, &mut rb).await;
    assert_eq!(server.metric("punch_rendezvous_relays_total").await, 1);
    server.stop().await;
}
