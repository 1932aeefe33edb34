//! The server's side of issue #23 with real clients on 127.0.0.1: hellos
//! bound to their name and token, punch orders signed for their recipient,
//! the server key file, and https/wss served by the server itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures::{SinkExt, StreamExt};
use punch_config::{RendezvousConfig, Secret, TlsSection};
use punch_rendezvous::protocol::{
    b64, decode_nonce, decode_public_key, sign_challenge, verify_order, ClientMsg, ErrorCode,
    Hello, ServerMsg, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("punch-rv-trust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start(cfg: RendezvousConfig) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(punch_rendezvous::server::run(listener, cfg, cancel.clone()));
    (addr, cancel)
}

async fn recv<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> ServerMsg {
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

async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, msg: &ClientMsg) {
    ws.send(Message::text(serde_json::to_string(msg).unwrap()))
        .await
        .unwrap();
}

/// Opens `/v1/ws` over `stream` and answers the challenge with a hello
/// that claims `name` and `token` but is signed for `signed_name` and
/// `signed_token`. Returns the socket, the answer and the nonce.
async fn hello_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    url: &str,
    key: &SigningKey,
    (name, token): (&str, Option<&str>),
    (signed_name, signed_token): (&str, Option<&str>),
) -> (WebSocketStream<S>, ServerMsg, [u8; 32]) {
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
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
        nat: None,
        rtt_us: None,
        token: token.map(str::to_owned),
        signature: sign_challenge(key, &nonce, signed_name, signed_token),
        observe_only: false,
    };
    send(&mut ws, &ClientMsg::Hello(hello)).await;
    let answer = recv(&mut ws).await;
    (ws, answer, nonce)
}

async fn hello(
    addr: SocketAddr,
    key: &SigningKey,
    claimed: (&str, Option<&str>),
    signed: (&str, Option<&str>),
) -> (WebSocketStream<TcpStream>, ServerMsg, [u8; 32]) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    hello_over(tcp, &format!("ws://{addr}/v1/ws"), key, claimed, signed).await
}

fn refusal(msg: &ServerMsg) -> Option<ErrorCode> {
    match msg {
        ServerMsg::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn a_hello_signed_for_another_name_or_token_is_refused() {
    let (addr, cancel) = start(RendezvousConfig {
        token: Some(Secret::new("net")),
        ..RendezvousConfig::default()
    })
    .await;
    let alice = SigningKey::from_bytes(&[1; 32]);
    let t = Some("net");
    // What alice signed for this connection's nonce, sent under another
    // name (a replay into another registration): refused.
    let (_, answer, _) = hello(addr, &alice, ("mallory", t), ("alice", t)).await;
    assert_eq!(
        refusal(&answer),
        Some(ErrorCode::BadSignature),
        "{answer:?}"
    );
    // Signed without the token, the token added afterwards: refused.
    let (_, answer, _) = hello(addr, &alice, ("alice", t), ("alice", None)).await;
    assert_eq!(
        refusal(&answer),
        Some(ErrorCode::BadSignature),
        "{answer:?}"
    );
    // The real thing registers.
    let (_, answer, _) = hello(addr, &alice, ("alice", t), ("alice", t)).await;
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    cancel.cancel();
}

#[tokio::test]
async fn punch_orders_are_signed_for_their_recipient_and_registration() {
    let dir = temp_dir("orders");
    let key_file = dir.join("server.key");
    let (addr, cancel) = start(RendezvousConfig {
        key_file: Some(key_file.clone()),
        ..RendezvousConfig::default()
    })
    .await;
    let (a, b) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    );
    let (mut wa, welcome, nonce_a) = hello(addr, &a, ("alice", None), ("alice", None)).await;
    let (mut wb, _, nonce_b) = hello(addr, &b, ("bob", None), ("bob", None)).await;
    let ServerMsg::Welcome {
        server_key: Some(server_key),
        ..
    } = welcome
    else {
        panic!("welcome names the server key: {welcome:?}")
    };
    // The key file was made private, and is the key that signs.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_punch-rendezvous"))
        .args(["pubkey", "--key", key_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), server_key);
    let server = decode_public_key(&server_key).unwrap();
    send(&mut wa, &ClientMsg::Connect { peer: "bob".into() }).await;
    let ServerMsg::Punch(to_a) = recv(&mut wa).await else {
        panic!("alice gets an order")
    };
    let ServerMsg::Punch(to_b) = recv(&mut wb).await else {
        panic!("bob gets an order")
    };
    assert!(verify_order(&server, "alice", &nonce_a, &to_a).is_ok());
    assert!(verify_order(&server, "bob", &nonce_b, &to_b).is_ok());
    // Not good for the other daemon, nor for another registration.
    assert!(verify_order(&server, "bob", &nonce_b, &to_a).is_err());
    assert!(verify_order(&server, "alice", &nonce_b, &to_a).is_err());
    cancel.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn a_server_key_readable_by_others_exits_2_with_the_chmod_hint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("exposed");
    let key = dir.join("server.key");
    let out = Command::new(env!("CARGO_BIN_EXE_punch-rendezvous"))
        .args(["keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.join("rendezvous.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nkey_file = \"server.key\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_punch-rendezvous"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pki(dir: &Path) -> (PathBuf, TlsSection) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    punch_service::secret_file::write_private(
        &key_path,
        leaf_key.serialize_pem().as_bytes(),
        false,
    )
    .unwrap();
    (
        ca_path,
        TlsSection {
            cert: cert_path,
            key: key_path,
        },
    )
}

#[tokio::test]
async fn the_server_speaks_https_and_wss_itself() {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("tls");
    let (ca, tls) = pki(&dir);
    let cfg_file = dir.join("rendezvous.toml");
    std::fs::write(
        &cfg_file,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            tls.cert.display().to_string(),
            tls.key.display().to_string()
        ),
    )
    .unwrap();
    let (addr, cancel) = start(RendezvousConfig {
        tls: Some(tls),
        ..RendezvousConfig::default()
    })
    .await;
    // The container health probe follows the config to https.
    // (blocking, so off the runtime thread that must serve the request)
    let args = [
        "--config".to_owned(),
        cfg_file.display().to_string(),
        "healthcheck".to_owned(),
        "--addr".to_owned(),
        addr.to_string(),
    ];
    let probe = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_punch-rendezvous"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    // /healthz over https.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // A registration over wss.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let key = SigningKey::from_bytes(&[5; 32]);
    let url = format!("wss://127.0.0.1:{}/v1/ws", addr.port());
    let (_, answer, _) = hello_over(tls, &url, &key, ("carol", None), ("carol", None)).await;
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");
    // Plain http to a TLS port is not served.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    cancel.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}
