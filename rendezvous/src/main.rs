//! `punch-rendezvous`: run the rendezvous server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use punch_config::{RendezvousConfig, Secret};
use tokio_util::sync::CancellationToken;

/// The punchd rendezvous server: daemons register here, learn their public
/// endpoint and get punch orders for each other.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// rendezvous.toml to read.
    #[arg(long, value_name = "FILE", env = "PUNCH_RENDEZVOUS_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding the config (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR", env = "PUNCH_RENDEZVOUS_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Network token daemons must present, overriding the config (empty:
    /// keep the config's).
    #[arg(long, env = "PUNCH_RENDEZVOUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut cfg = match &args.config {
        Some(path) => match RendezvousConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => RendezvousConfig::default(),
    };
    if let Some(listen) = args.listen {
        cfg.listen = listen;
    }
    // An empty value (e.g. `PUNCH_RENDEZVOUS_TOKEN=` from a compose file
    // with the variable unset) means "not given", never "the empty token".
    if let Some(token) = args.token.filter(|t| !t.is_empty()) {
        cfg.token = Some(Secret::new(token));
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(Cmd::Healthcheck { addr }) = args.cmd {
        let addr = addr.unwrap_or_else(|| loopback_for(cfg.listen));
        return match runtime.block_on(healthcheck(addr)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    match runtime.block_on(serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(cfg: RendezvousConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another server using it?",
                cfg.listen
            )
        })?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        punch_service::shutdown_signal().await;
        tracing::info!("shutdown requested");
        punch_service::notify_stopping("shutting down");
        on_signal.cancel();
    });
    punch_service::notify_ready(&format!("listening on {}", cfg.listen));
    punch_rendezvous::server::run(listener, cfg, cancel)
        .await
        .context("rendezvous server failed")
}

/// Where to reach a server that listens on `listen` from the same host.
fn loopback_for(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

/// One `GET /healthz` over a plain TCP connection. A full HTTP client would
/// be the only use of one in the server; the probe needs just the status line.
async fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // The status line fits in far less; never read an unbounded reply.
        let mut head = Vec::with_capacity(512);
        (&mut stream).take(512).read_to_end(&mut head).await?;
        let status_line = String::from_utf8_lossy(&head);
        let status_line = status_line.lines().next().unwrap_or("");
        match status_line.split_whitespace().nth(1) {
            Some("200") => Ok(()),
            _ => anyhow::bail!("{addr} answered {status_line:?}"),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), probe)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 3 s"))?
}
