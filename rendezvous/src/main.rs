//! `punch-rendezvous`: run the rendezvous server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use punch_config::{RendezvousConfig, Secret};
use tokio_util::sync::CancellationToken;

/// The punchd rendezvous server: daemons register here, learn their public
/// endpoint and get punch orders for each other.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// rendezvous.toml to read.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address, overriding the config (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Network token daemons must present, overriding the config.
    #[arg(long, env = "PUNCH_RENDEZVOUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    if let Some(token) = args.token {
        cfg.token = Some(Secret::new(token));
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
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
        punch_rendezvous::server::shutdown_signal().await;
        tracing::info!("shutdown requested");
        on_signal.cancel();
    });
    punch_rendezvous::server::run(listener, cfg, cancel)
        .await
        .context("rendezvous server failed")
}
