//! Everything on 127.0.0.1 in one process: an embedded rendezvous, peer
//! configs written as TOML (so they pass the same validation as a user's),
//! and an echo service. Used by `punchd demo` and the integration tests.

use std::net::SocketAddr;
use std::path::Path;

use punch_config::{PeerConfig, PublicKeyBytes, RendezvousConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// An embedded rendezvous server.
#[derive(Debug)]
pub struct Rendezvous {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its order-signing key, for `[rendezvous] server_key`.
    pub server_key: PublicKeyBytes,
    /// Whether it serves https (`[tls]`).
    tls: bool,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Rendezvous {
    /// Starts one on `127.0.0.1:0`.
    pub async fn start(cfg: RendezvousConfig) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", cfg).await
    }

    /// Starts one on a given address (tests restart it on the same port).
    pub async fn start_on(addr: &str, mut cfg: RendezvousConfig) -> std::io::Result<Self> {
        let listener = bind_listener(addr).await?;
        let addr = listener.local_addr()?;
        if cfg.observe_port.is_none() {
            // NAT discovery's default port (listen + 1) may be taken on a
            // busy host (a test run holds thousands of sockets); then the
            // server only warns and netcheck reads "unknown". Pick a port
            // free for both TCP and UDP instead.
            cfg.observe_port = free_port_pair(addr.ip());
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let trust =
            punch_rendezvous::server::Trust::from_config(&cfg).map_err(std::io::Error::other)?;
        let server_key =
            PublicKeyBytes::from_base64(&trust.public_key()).map_err(std::io::Error::other)?;
        let tls = cfg.tls.is_some();
        tracker.spawn(punch_rendezvous::server::run_with(
            listener,
            cfg,
            trust,
            cancel.clone(),
        ));
        tracker.close();
        Ok(Self {
            addr,
            server_key,
            tls,
            cancel,
            tracker,
        })
    }

    /// The URL daemons use.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops it and waits.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.wait().await;
    }
}

/// One service a test daemon exposes.
#[derive(Debug, Clone)]
pub struct ExposeSpec {
    /// Service name.
    pub name: String,
    /// Target address.
    pub target: String,
    /// Allowed peers.
    pub allow: Vec<String>,
}

/// Builds a peer config on loopback: admin on port 0, punch port 0,
/// forwards on port 0. `peers` are (name, key); `forwards` are (peer, service).
pub fn peer_config(
    name: &str,
    rendezvous_url: &str,
    peers: &[(&str, PublicKeyBytes)],
    exposes: &[ExposeSpec],
    forwards: &[(&str, &str)],
    extra_punch: &str,
) -> Result<PeerConfig, punch_config::ConfigError> {
    // Each daemon of the process its own admin token file, in the temp
    // folder (the default, under /run, is for installed daemons).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token_file = std::env::temp_dir().join(format!(
        "punchd-{}-{n}-{name}.admin-token",
        std::process::id()
    ));
    let mut toml = format!(
        "name = \"{name}\"\nkey_file = \"{name}.key\"\n\n[rendezvous]\nurl = \"{rendezvous_url}\"\n\n\
         [punch]\nport = 0\n{extra_punch}\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
        token_file.display().to_string()
    );
    for (peer, key) in peers {
        toml.push_str(&format!(
            "\n[[peers]]\nname = \"{peer}\"\npublic_key = \"{}\"\n",
            key.to_base64()
        ));
    }
    for e in exposes {
        let allow: Vec<String> = e.allow.iter().map(|a| format!("\"{a}\"")).collect();
        toml.push_str(&format!(
            "\n[[expose]]\nname = \"{}\"\ntarget = \"{}\"\nallow = [{}]\n",
            e.name,
            e.target,
            allow.join(", ")
        ));
    }
    for (peer, service) in forwards {
        toml.push_str(&format!(
            "\n[[forward]]\nlisten = \"127.0.0.1:0\"\npeer = \"{peer}\"\nservice = \"{service}\"\n"
        ));
    }
    PeerConfig::parse_str(Path::new(&format!("<{name} generated>")), &toml)
}

/// A TCP echo service on `127.0.0.1:0`, running until `cancel`.
pub async fn echo_server(
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let conns = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            let cancel = cancel.clone();
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                tokio::select! {
                    _ = tokio::io::copy(&mut r, &mut w) => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

/// Binds the listener on `addr`. With port 0, a port that is free over
/// UDP too ([`free_port_pair`]): the server's UDP observation socket takes
/// the listener's port, and on a busy host (a test run holds thousands of
/// sockets) an ephemeral TCP port can be someone's UDP port; then the
/// server only warns and has no QUIC path, and a test that asks it over
/// UDP hangs.
async fn bind_listener(addr: &str) -> std::io::Result<TcpListener> {
    let wanted: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let port = match wanted.port() {
        0 => free_port_pair(wanted.ip()).unwrap_or(0),
        p => p,
    };
    TcpListener::bind(SocketAddr::new(wanted.ip(), port)).await
}

/// A port free on `ip` for both TCP and UDP right now (closed again before
/// it returns: the caller binds it next).
pub fn free_port_pair(ip: std::net::IpAddr) -> Option<u16> {
    (0..16).find_map(|_| {
        let tcp = std::net::TcpListener::bind((ip, 0)).ok()?;
        let port = tcp.local_addr().ok()?.port();
        std::net::UdpSocket::bind((ip, port)).ok().map(|_| port)
    })
}
