//! Everything on 127.0.0.1 in one process: an embedded rendezvous, peer
//! configs written as TOML (so they pass the same validation as a user's),
//! and an echo service. Used by `punchd demo` and the integration tests.

use std::net::SocketAddr;
use std::path::Path;

use punch_config::{PeerConfig, PublicKeyBytes, RendezvousConfig};
use punch_rendezvous::server;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// An embedded rendezvous server.
#[derive(Debug)]
pub struct Rendezvous {
    /// Where it listens.
    pub addr: SocketAddr,
    /// NAT discovery's second endpoint (TCP and UDP), if it has one.
    pub observe_port: Option<u16>,
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
    /// Every socket is bound here and handed to the server held
    /// ([`server::Bound`]): with port 0, the listener's port is one free
    /// over UDP too (the UDP observation socket takes it), and NAT
    /// discovery's second endpoint, unless the config names one, gets a
    /// port of its own the same way. On a busy host (a test run holds
    /// thousands of sockets) a port found free and closed again can be
    /// someone else's before the server binds it; then the server would
    /// only warn, and a test asking it over UDP would hang.
    pub async fn start_on(addr: &str, cfg: RendezvousConfig) -> std::io::Result<Self> {
        let wanted: SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let (listener, udp) = match cfg.udp_listen {
            Some(at) => (server::bind::tcp(wanted)?, server::bind::udp(at)?),
            None => server::bind::same_port(wanted)?,
        };
        let addr = listener.local_addr()?;
        // `Some(0)`: no second endpoint; none named: any port, held.
        let observe = match cfg.observe_port {
            Some(0) => None,
            port => Some(server::bind::same_port(SocketAddr::new(
                addr.ip(),
                port.unwrap_or(0),
            ))?),
        };
        let bound = server::Bound::new(vec![listener], vec![udp], observe);
        let observe_port = bound.observe_port();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let trust = server::Trust::from_config(&cfg).map_err(std::io::Error::other)?;
        let server_key =
            PublicKeyBytes::from_base64(&trust.public_key()).map_err(std::io::Error::other)?;
        let tls = cfg.tls.is_some();
        tracker.spawn(server::run_bound(
            bound,
            server::LiveConfig::new(cfg),
            trust,
            cancel.clone(),
        ));
        tracker.close();
        Ok(Self {
            addr,
            observe_port,
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
    // The forward's queue, so a burst of connections through a forward
    // does not overflow the service's instead.
    let listener = crate::forward::listen::bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))?;
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
