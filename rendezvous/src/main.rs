//! `punch-rendezvous`: run the rendezvous server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use punch_config::{RendezvousConfig, Secret};
use punch_rendezvous::server::Trust;
use tokio_util::sync::CancellationToken;

/// The punchd rendezvous server: daemons register here, learn their public
/// endpoint and get punch orders for each other.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// rendezvous.toml to read.
    #[arg(long, value_name = "FILE", env = "PUNCH_RENDEZVOUS_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding the config's `listen` (default
    /// 0.0.0.0:8080). Repeat it (or separate with commas in the
    /// environment) for several, e.g. `--listen 0.0.0.0:8080 --listen
    /// [::]:8080`; an IPv6 address listens v6-only.
    #[arg(
        long,
        value_name = "ADDR",
        env = "PUNCH_RENDEZVOUS_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<std::net::SocketAddr>,
    /// Network token daemons must present, overriding the config (empty:
    /// keep the config's). Prefer the environment (`PUNCH_TOKEN`, or the
    /// older `PUNCH_RENDEZVOUS_TOKEN`) or `--token-file`: a command line
    /// is visible to every user in `ps`.
    #[arg(long, env = "PUNCH_TOKEN", hide_env_values = true, value_parser = secret)]
    token: Option<Secret>,
    /// Read the network token from this file (first line), overriding the
    /// config.
    #[arg(
        long,
        value_name = "FILE",
        env = "PUNCH_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Clone, Subcommand)]
enum Cmd {
    /// Ask a running server's `/healthz` whether it is up: exit 0 if it
    /// answers 200 within 3 s, 1 otherwise. This is the container
    /// HEALTHCHECK, because the runtime image has no shell and no curl.
    Healthcheck {
        /// Server to probe (default: the `--listen`/config address, on
        /// 127.0.0.1 when it listens on all addresses).
        #[arg(long, value_name = "ADDR")]
        addr: Option<std::net::SocketAddr>,
    },
    /// Create a server key (mode 0600) for `key_file` and print its public
    /// key, the `server_key` daemons pin.
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of a server key file (default: the config's
    /// `key_file`), for daemons' `[rendezvous] server_key`.
    Pubkey {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colour only at a terminal, never with NO_COLOR (no-color.org):
        // journald and `docker logs` get plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let cfg = match resolve_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match &args.cmd {
        Some(Cmd::Keygen { out }) => return keygen(out),
        Some(Cmd::Pubkey { key }) => return pubkey(key.as_ref().or(cfg.key_file.as_ref())),
        _ => {}
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(Cmd::Healthcheck { addr }) = args.cmd {
        // The first listen address; the config guarantees there is one.
        let first = cfg.listen.first().copied();
        let Some(addr) = addr.or(first.map(loopback_for)) else {
            eprintln!("error: no listen address");
            return ExitCode::from(2);
        };
        return match runtime.block_on(healthcheck(addr, cfg.tls.is_some())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let trust = match Trust::from_config(&cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.key_file.is_none() {
        tracing::warn!("no key_file: punch orders are signed with a key made for this run only, which daemons cannot pin; set key_file in rendezvous.toml");
    }
    match runtime.block_on(serve(cfg, trust, &args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The configuration from the file (if any), the command line and the
/// environment; run again on `SIGHUP`, so a changed token file or
/// `[limits]` is picked up the way it was at start.
fn resolve_config(args: &Args) -> Result<RendezvousConfig, String> {
    let mut cfg = match &args.config {
        Some(path) => RendezvousConfig::load(path).map_err(|e| e.to_string())?,
        None => RendezvousConfig::default(),
    };
    if !args.listen.is_empty() {
        let mut listen = args.listen.clone();
        let count = listen.len();
        listen.sort_unstable();
        listen.dedup();
        if listen.len() != count {
            return Err("--listen names one address twice".to_owned());
        }
        cfg.listen = args.listen.clone();
    }
    // An empty value (e.g. `PUNCH_TOKEN=` from a compose file with the
    // variable unset) means "not given", never "the empty token".
    let token = args
        .token
        .clone()
        .or_else(|| {
            std::env::var("PUNCH_RENDEZVOUS_TOKEN")
                .ok()
                .map(Secret::new)
        })
        .filter(|t| !t.expose().is_empty());
    if let Some(token) = token {
        cfg.token = Some(token);
        cfg.token_file = None;
    }
    if let Some(file) = &args.token_file {
        cfg.token_file = Some(file.clone());
        cfg.token = None;
    }
    if let Some(file) = cfg.token_file.take() {
        let t = punch_service::secret_file::read_token(&file)
            .map_err(|e| format!("token file: {e}"))?;
        cfg.token = Some(Secret::new(t));
    }
    Ok(cfg)
}

/// `--token` as a [`Secret`], so `Args`' `Debug` never shows it.
fn secret(value: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(value))
}

fn keygen(out: &std::path::Path) -> ExitCode {
    let created = punch_rendezvous::server::create_key(out);
    if created.is_ok() {
        eprintln!(
            "wrote {} (keep it private); server_key for daemons:",
            out.display()
        );
    }
    print_public(created)
}

fn pubkey(key: Option<&PathBuf>) -> ExitCode {
    let Some(path) = key else {
        eprintln!("error: no key file: pass --key FILE, or --config with key_file set");
        return ExitCode::from(2);
    };
    print_public(punch_rendezvous::server::load_key(path))
}

/// Prints the public half (what daemons pin), or the error (exit 2).
fn print_public(
    key: Result<ed25519_dalek::SigningKey, punch_rendezvous::server::TrustError>,
) -> ExitCode {
    match key {
        Ok(key) => {
            println!(
                "{}",
                punch_rendezvous::protocol::b64(key.verifying_key().as_bytes())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve(cfg: RendezvousConfig, trust: Trust, args: &Args) -> anyhow::Result<()> {
    let listeners = punch_rendezvous::server::bind::tcp_all(&cfg.listen)?;
    let listening = cfg
        .listen
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    // Watched from here, before READY (see `shutdown_signal`).
    let shutdown = punch_service::shutdown_signal().context("cannot watch for SIGTERM")?;
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested");
        punch_service::notify_stopping("shutting down");
        on_signal.cancel();
    });
    let ready = format!("listening on {listening}");
    let live = punch_rendezvous::server::LiveConfig::new(cfg);
    let mut hangups = punch_service::reload_signals().context("cannot watch for SIGHUP")?;
    let (reload_live, stop) = (live.clone(), cancel.clone());
    let args = args.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(()) = hangups.recv() => {}
            }
            punch_service::notify_reloading();
            match resolve_config(&args) {
                Ok(new) => {
                    reload_live.reload(&new);
                    tracing::info!("configuration reloaded: token and [limits] apply to new connections (listen, tls and key_file change only with a restart)");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reload refused; the running configuration stays")
                }
            }
            punch_service::notify_ready(&ready);
        }
    });
    punch_service::notify_ready(&format!("listening on {listening}"));
    punch_rendezvous::server::run_listeners(listeners, live, trust, cancel)
        .await
        .context("rendezvous server failed")
}

/// Where to reach a server that listens on `listen` from the same host.
fn loopback_for(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = listen;
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            addr.set_ip(std::net::Ipv6Addr::LOCALHOST.into());
        }
        _ => {}
    }
    addr
}

/// One `GET /healthz` over a plain TCP connection. A full HTTP client would
/// be the only use of one in the server; the probe needs just the status line.
async fn healthcheck(addr: std::net::SocketAddr, tls: bool) -> anyhow::Result<()> {
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
    async fn ask(
        mut stream: impl AsyncRead + AsyncWrite + Unpin,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<()> {
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // The status line fits in far less; never read an unbounded reply.
        let mut head = Vec::with_capacity(512);
        let _ = (&mut stream).take(512).read_to_end(&mut head).await;
        let status_line = String::from_utf8_lossy(&head);
        let status_line = status_line.lines().next().unwrap_or("");
        match status_line.split_whitespace().nth(1) {
            Some("200") => Ok(()),
            _ => anyhow::bail!("{addr} answered {status_line:?}"),
        }
    }
    let probe = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        if !tls {
            return ask(stream, addr).await;
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(probe_tls()?));
        let name = rustls_pki_types::ServerName::from(addr.ip());
        ask(connector.connect(name, stream).await?, addr).await
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), probe)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 3 s"))?
}

/// TLS for the health probe with `[tls]` set. It accepts any certificate:
/// the probe runs beside the server and asks whether it answers, which is
/// no trust decision (daemons verify properly).
fn probe_tls() -> anyhow::Result<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.0.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.0.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Ok(config)
}
