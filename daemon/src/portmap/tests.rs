//! The mapper against fakes on loopback (127.0.0.0/8 only): a LAN with
//! no router, and a hostile "router" answering junk. The real router
//! daemon (miniupnpd) is exercised by the lab (`lab/tests/portmap.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::plan::Protocol;
use super::proto::{Ports, Target};
use super::{probe, Board};

fn target(gw: Ipv4Addr) -> Target {
    Target {
        gateway: gw,
        local: Ipv4Addr::LOCALHOST,
        ports: Ports {
            tcp: NonZeroU16::new(40000).unwrap_or(NonZeroU16::MIN),
            udp: NonZeroU16::new(40000),
        },
        external: None,
    }
}

#[tokio::test]
async fn no_router_costs_at_most_the_probe_timeout() {
    // Nothing listens on 127.0.0.23: PCP/NAT-PMP get ICMP unreachable,
    // SSDP too; the probe must end well within its 1 s budget.
    let board = Board::default();
    let started = Instant::now();
    let (held, answered) = probe(target(Ipv4Addr::new(127, 0, 0, 23)), &board).await;
    let took = started.elapsed();
    assert!(held.is_none());
    assert!(answered.is_empty(), "{answered:?}");
    assert!(took <= Duration::from_millis(1300), "probe took {took:?}");
    let probes: Vec<u64> = board.counters.all().map(|(_, c)| c[0]).collect();
    assert_eq!(probes, vec![1, 1, 1]);
}

/// A UDP "router" on `gw:5351` that answers every request with `reply(req)`.
/// How the fake answers a request.
type Reply = fn(&[u8]) -> Vec<u8>;

async fn junk_pcp(gw: Ipv4Addr, reply: Reply) -> tokio::task::JoinHandle<()> {
    let sock = tokio::net::UdpSocket::bind(SocketAddr::from((gw, 5351)))
        .await
        .unwrap_or_else(|e| panic!("bind {gw}:5351: {e}"));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&reply(&buf[..n]), from).await;
        }
    })
}

#[tokio::test]
async fn junk_answers_from_the_gateway_are_refused_without_panic() {
    let cases: [(u8, Reply); 4] = [
        // Truncated: the version byte and nothing else.
        (31, |req| vec![req.first().copied().unwrap_or(0)]),
        // Oversize: 1,400 bytes of a plausible header then garbage.
        (32, |req| {
            let mut v = vec![
                req.first().copied().unwrap_or(0),
                req.get(1).copied().unwrap_or(0) | 0x80,
                0,
                0,
            ];
            v.resize(1400, 0xAB);
            v
        }),
        // Random-looking bytes.
        (33, |_| {
            (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5A).collect()
        }),
        // Right size, wrong opcode and an absurd lifetime.
        (34, |req| {
            let mut v = vec![0u8; 60];
            v[0] = req.first().copied().unwrap_or(2);
            v[1] = 0xFF;
            v[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
            v
        }),
    ];
    for (last, reply) in cases {
        let gw = Ipv4Addr::new(127, 0, 0, last);
        let fake = junk_pcp(gw, reply).await;
        let board = Board::default();
        let started = Instant::now();
        let (held, answered) = probe(target(gw), &board).await;
        fake.abort();
        assert!(held.is_none(), "case {last}: junk gave a mapping");
        assert!(started.elapsed() < Duration::from_secs(4), "case {last}");
        // The refusal is counted as a failure of the protocol that answered.
        let failures: u64 = board.counters.all().map(|(_, c)| c[3]).sum();
        assert!(
            failures >= 1 || answered.is_empty(),
            "case {last}: {answered:?}"
        );
    }
}

/// An SSDP + HTTP "router" on loopback: the search answer points at an
/// HTTP server that sends `body`.
async fn junk_upnp(gw: Ipv4Addr, body: Vec<u8>) -> Vec<tokio::task::JoinHandle<()>> {
    let http = tokio::net::TcpListener::bind(SocketAddr::from((gw, 0)))
        .await
        .unwrap_or_else(|e| panic!("bind http: {e}"));
    let http_port = http.local_addr().map(|a| a.port()).unwrap_or(0);
    let ssdp = tokio::net::UdpSocket::bind(SocketAddr::from((gw, 1900)))
        .await
        .unwrap_or_else(|e| panic!("bind {gw}:1900: {e}"));
    let a = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((_, from)) = ssdp.recv_from(&mut buf).await {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
                 USN: uuid:junk\r\nLOCATION: http://{gw}:{http_port}/rootDesc.xml\r\n\r\n"
            );
            let _ = ssdp.send_to(answer.as_bytes(), from).await;
        }
    });
    let b = tokio::spawn(async move {
        while let Ok((mut s, _)) = http.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = vec![0u8; 4096];
                let _ = s.read(&mut req).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    vec![a, b]
}

#[tokio::test]
async fn junk_upnp_descriptions_are_refused_without_panic() {
    let cases: [(u8, Vec<u8>); 3] = [
        // Oversize: 4 MiB (igd-next stops reading at 1 MiB).
        (41, vec![b'<'; 4 << 20]),
        // Malformed XML.
        (42, b"<root><device><deviceType>urn:x</device".to_vec()),
        // Well-formed, no WAN service.
        (
            43,
            b"<?xml version=\"1.0\"?><root><device><deviceType>x</deviceType></device></root>"
                .to_vec(),
        ),
    ];
    for (last, body) in cases {
        let gw = Ipv4Addr::new(127, 0, 0, last);
        let fakes = junk_upnp(gw, body).await;
        let board = Board::default();
        let (held, answered) = probe(target(gw), &board).await;
        for f in fakes {
            f.abort();
        }
        assert!(held.is_none(), "case {last}: junk gave a mapping");
        assert!(!answered.contains(&Protocol::Pcp));
    }
}

#[tokio::test]
async fn a_rendezvous_over_loopback_is_not_probed_nor_waited_for() {
    let board = std::sync::Arc::new(Board::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let mut m = super::PortMapper::spawn(board.clone(), cancel.clone(), &tracker);
    m.start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 5555)),
        40000,
        Some(40000),
    );
    let started = Instant::now();
    assert_eq!(m.settled(Duration::from_secs(5)).await, None);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(board.counters.all().all(|(_, c)| c == [0; 4]));
    // Off: the same, and nothing runs.
    let mut off = super::PortMapper::disabled();
    off.start(SocketAddr::from(([192, 0, 2, 2], 5555)), 40000, None);
    assert_eq!(off.settled(Duration::from_secs(5)).await, None);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
