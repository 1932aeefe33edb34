//! What the integration tests share: the real server on 127.0.0.1:0, a
//! WebSocket client that registers with a signed hello, and the relay
//! request. Each test binary uses its own subset.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures::{SinkExt, StreamExt};
use punch_config::RendezvousConfig;
use punch_rendezvous::protocol::{
    b64, decode_nonce, sign_challenge, ClientMsg, ErrorCode, Hello, ServerMsg, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) cancel: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub(crate) async fn start(cfg: RendezvousConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(punch_rendezvous::server::run(listener, cfg, cancel.clone()));
        Self { addr, cancel, task }
    }

    pub(crate) async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }

    pub(crate) async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The UDP observation endpoint a welcome names (on the server's host).
    pub(crate) fn udp_endpoint(&self, welcome: &ServerMsg) -> SocketAddr {
        let ServerMsg::Welcome {
            udp_port: Some(port),
            ..
        } = welcome
        else {
            panic!("welcome names the UDP observation port: {welcome:?}")
        };
        SocketAddr::new(self.addr.ip(), *port)
    }

    pub(crate) async fn metric(&self, line_prefix: &str) -> u64 {
        let text = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{text}"))
    }
}

pub(crate) async fn open(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .unwrap();
    ws
}

pub(crate) async fn recv(ws: &mut Ws) -> ServerMsg {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("no error");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

pub(crate) async fn send(ws: &mut Ws, msg: &ClientMsg) {
    ws.send(Message::text(serde_json::to_string(msg).unwrap()))
        .await
        .unwrap();
}

/// Runs the handshake; `forge` signs with another key than the one claimed.
pub(crate) async fn hello(
    addr: SocketAddr,
    name: &str,
    key: &SigningKey,
    token: Option<&str>,
    forge: bool,
) -> (Ws, ServerMsg) {
    let (ws, answer, _) = hello_udp(addr, name, key, token, forge, None).await;
    (ws, answer)
}

/// The handshake offering a UDP port; also returns the challenge nonce
/// (what UDP probes are signed over).
pub(crate) async fn hello_udp(
    addr: SocketAddr,
    name: &str,
    key: &SigningKey,
    token: Option<&str>,
    forge: bool,
    udp_port: Option<u16>,
) -> (Ws, ServerMsg, [u8; 32]) {
    let announce = Announce {
        udp_port,
        ..Announce::default()
    };
    hello_announcing(addr, name, key, token, forge, announce).await
}

/// What a hello may announce beyond name and key.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Announce {
    /// The UDP punch port.
    pub(crate) udp_port: Option<u16>,
    /// Router-mapped endpoints (TCP, UDP).
    pub(crate) mapped: (Option<SocketAddr>, Option<SocketAddr>),
    /// The RTT the daemon measured connecting.
    pub(crate) rtt_us: Option<u64>,
}

/// The handshake announcing `announce`.
pub(crate) async fn hello_announcing(
    addr: SocketAddr,
    name: &str,
    key: &SigningKey,
    token: Option<&str>,
    forge: bool,
    announce: Announce,
) -> (Ws, ServerMsg, [u8; 32]) {
    let Announce {
        udp_port,
        mapped,
        rtt_us,
    } = announce;
    let mut ws = open(addr).await;
    let ServerMsg::Challenge { version, nonce } = recv(&mut ws).await else {
        panic!("expected challenge")
    };
    assert_eq!(version, PROTOCOL_VERSION);
    let nonce = decode_nonce(&nonce).unwrap();
    let signer = if forge {
        SigningKey::from_bytes(&[0xEE; 32])
    } else {
        key.clone()
    };
    let msg = ClientMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        public_key: b64(key.verifying_key().as_bytes()),
        local_addrs: vec!["192.0.2.10:40000".parse().unwrap()],
        udp_port,
        mapped_tcp: mapped.0,
        mapped_udp: mapped.1,
        nat: None,
        rtt_us,
        token: token.map(str::to_owned),
        signature: sign_challenge(&signer, &nonce, name, token),
        observe_only: false,
    });
    send(&mut ws, &msg).await;
    let answer = recv(&mut ws).await;
    (ws, answer, nonce)
}

pub(crate) fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub(crate) fn error_code(msg: &ServerMsg) -> ErrorCode {
    match msg {
        ServerMsg::Error { code, .. } => *code,
        other => panic!("expected error, got {other:?}"),
    }
}

/// The next message must be an error with `code` (or the socket closes).
pub(crate) async fn expect_refused(ws: &mut Ws, code: ErrorCode) {
    assert_eq!(error_code(&recv(ws).await), code);
}

/// Opens `/v1/relay/{session}?token=…`; the HTTP status if refused.
pub(crate) async fn relay(addr: SocketAddr, session: &str, token: &str) -> Result<Ws, u16> {
    let url = format!("ws://{addr}/v1/relay/{session}?token={token}");
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("relay request failed: {e}"),
    }
}

pub(crate) async fn recv_binary(ws: &mut Ws) -> Vec<u8> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame in time")
            .expect("stream open")
            .expect("no error");
        if let Message::Binary(b) = msg {
            return b.to_vec();
        }
    }
}

/// `from` asks for a punch with `peer_name` (registered on `peer`): the two
/// orders, `from`'s first.
pub(crate) async fn punch(
    from: &mut Ws,
    peer: &mut Ws,
    peer_name: &str,
) -> (
    punch_rendezvous::protocol::PunchOrder,
    punch_rendezvous::protocol::PunchOrder,
) {
    send(
        from,
        &ClientMsg::Connect {
            peer: peer_name.to_owned(),
        },
    )
    .await;
    let (ServerMsg::Punch(to_from), ServerMsg::Punch(to_peer)) =
        (recv(from).await, recv(peer).await)
    else {
        panic!("both sides get punch orders")
    };
    (to_from, to_peer)
}

/// Opens `/v1/relay/{session}`, expecting a refusal: its status and body.
pub(crate) async fn relay_refusal(addr: SocketAddr, session: &str, token: &str) -> (u16, String) {
    let url = format!("ws://{addr}/v1/relay/{session}?token={token}");
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("relay join to {session} was admitted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            (
                resp.status().as_u16(),
                String::from_utf8_lossy(body).into_owned(),
            )
        }
        Err(e) => panic!("relay request failed: {e}"),
    }
}

/// Sends `datagram` from `sock` to the server and returns the ack, if any
/// arrives within a short wait.
pub(crate) async fn probe(
    sock: &tokio::net::UdpSocket,
    to: SocketAddr,
    datagram: &[u8],
) -> Option<Vec<u8>> {
    sock.send_to(datagram, to).await.unwrap();
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// A ping and its pong: everything `ws` sent before has been handled.
pub(crate) async fn round_trip(ws: &mut Ws, id: u64) {
    send(ws, &ClientMsg::Ping { id, rtt_us: None }).await;
    assert!(matches!(recv(ws).await, ServerMsg::Pong { id: got, .. } if got == id));
}
