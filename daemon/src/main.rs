//! `punchd`: the command line. Everything here is the binary edge: parse
//! arguments, turn errors into one clear line and an exit code (0 ok,
//! 2 bad usage or config, 1 runtime failure).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use punch_config::PeerConfig;
use punchd::Identity;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc. TLS hands every received record's
/// plaintext over in a fresh 16 KiB buffer and seals every sent one into
/// another; glibc gave those pages back to the kernel as they were freed
/// and faulted them in again (page faults and page clearing were ~6 % of
/// the daemon's CPU in a bulk transfer). mimalloc keeps them: +12–41 %
/// throughput at zero delay, for ~20 MiB more resident after a transfer
/// (BENCHMARKS.md, "The allocator"). The `mimalloc` feature (default)
/// chooses it.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Peer-to-peer NAT hole punching with authenticated, multiplexed port forwarding.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Run the daemon with this peer.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new Ed25519 identity (mode 0600) and print its public key.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of an identity file.
    Pubkey {
        /// The identity file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Validate a peer.toml (and its key file) and exit.
    CheckConfig {
        /// The config to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show a running daemon's peers, paths and forwards.
    Status {
        /// Admin address of the daemon (default 127.0.0.1:7070).
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        admin: Option<SocketAddr>,
        /// Read the admin address from this peer.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's admin token file (default: the config's
        /// `[admin] token_file`, or the default for the admin port). Only
        /// needed for an `allow_remote` admin API.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Drop a peer's tunnel and punch again (needs the admin token: run as
    /// the daemon's user, or pass --token-file).
    Repunch {
        /// The peer, as named in [[peers]].
        peer: String,
        /// Admin address of the daemon (default 127.0.0.1:7070).
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        admin: Option<SocketAddr>,
        /// Read the admin address and token file from this peer.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's admin token file.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Ask a running daemon to re-read its peer.toml (as SIGHUP does): what
    /// changed takes effect, tunnels to unchanged peers stay up. An invalid
    /// file is refused with its error (exit 2) and the daemon keeps running
    /// as before. Needs the admin token.
    Reload {
        /// Admin address of the daemon (default 127.0.0.1:7070).
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        admin: Option<SocketAddr>,
        /// Read the admin address and token file from this peer.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's admin token file.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Find out how this host's NAT maps TCP and UDP (endpoint-independent,
    /// endpoint-dependent or blocked; port preservation; a predictable
    /// step) and which port-mapping protocols the gateway answers, by
    /// asking the configured rendezvous. Needs no running daemon.
    Netcheck {
        /// The peer.toml whose rendezvous to ask.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the JSON document (the same as status's `nat`).
        #[arg(long)]
        json: bool,
    },
    /// Run an embedded rendezvous and two daemons on loopback, push bytes
    /// through a forward, print a report.
    Demo {
        /// Also print the daemons' logs (as `RUST_LOG=info` would).
        #[arg(long, short)]
        verbose: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the punchd(1) man page to stdout, or with --out write one page
    /// per command (punchd.1, punchd-status.1, …) into a folder.
    Man {
        /// Folder to write the pages into.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// An error with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

fn runtime(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: error.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo is for reading its report: its daemons stay quiet unless
    // asked (`--verbose` or `RUST_LOG`).
    let default_level = match &cli.command {
        Some(Command::Demo { verbose: false }) => "off",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(colour(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}

/// Colour only for a person at a terminal, and never when `NO_COLOR` is
/// set to anything (<https://no-color.org>): a log file or a pipe gets
/// plain text.
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    match (cli.command, cli.config) {
        (Some(Command::Keygen { out }), _) => keygen(&out),
        (Some(Command::Pubkey { key }), _) => {
            let id = Identity::load(&key).map_err(usage)?;
            println!("{}", id.public_key());
            Ok(())
        }
        (Some(Command::CheckConfig { config }), _) => {
            let (cfg, id) = load(&config)?;
            println!(
                "{}: ok (name {}, public key {}, {} peer(s), {} expose(s), {} forward(s))",
                config.display(),
                cfg.name,
                id.public_key(),
                cfg.peers.len(),
                cfg.expose.len(),
                cfg.forward.len()
            );
            Ok(())
        }
        (
            Some(Command::Status {
                admin,
                config,
                json,
                token_file,
            }),
            _,
        ) => {
            let target = AdminTarget::resolve(admin, config.as_deref(), token_file)?;
            status(&target, json)
        }
        (
            Some(Command::Repunch {
                peer,
                admin,
                config,
                token_file,
            }),
            _,
        ) => {
            let target = AdminTarget::resolve(admin, config.as_deref(), token_file)?;
            repunch(&target, &peer)
        }
        (
            Some(Command::Reload {
                admin,
                config,
                token_file,
            }),
            _,
        ) => {
            // The admin address is in the file: a file that does not load
            // cannot reach the daemon, which keeps running as it was.
            let target =
                AdminTarget::resolve(admin, config.as_deref(), token_file).map_err(|f| Failure {
                    code: f.code,
                    error: f.error.context(
                        "the daemon was not asked to reload (it keeps its running configuration); fix the file, or pass --admin",
                    ),
                })?;
            reload(&target)
        }
        (Some(Command::Demo { verbose }), _) => demo(verbose),
        (Some(Command::Netcheck { config, json }), _) => netcheck(&config, json),
        (Some(Command::Completions { shell }), _) => {
            clap_complete::generate(shell, &mut Cli::command(), "punchd", &mut std::io::stdout());
            Ok(())
        }
        (Some(Command::Man { out }), _) => man(out.as_deref()),
        (None, Some(config)) => run_daemon(&config),
        (None, None) => Err(usage(anyhow::anyhow!(
            "nothing to do: run `punchd --config peer.toml`, or `punchd --help`"
        ))),
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .map_err(runtime)
}

fn netcheck(config: &Path, json: bool) -> Result<(), Failure> {
    let cfg = PeerConfig::load(config).map_err(usage)?;
    let doc = tokio_runtime()?
        .block_on(punchd::control::netcheck::netcheck(&cfg))
        .map_err(runtime)?;
    if json {
        let text = serde_json::to_string_pretty(&doc)
            .context("cannot print the report")
            .map_err(runtime)?;
        println!("{text}");
    } else {
        print!("{}", doc.human());
    }
    Ok(())
}

fn keygen(out: &Path) -> Result<(), Failure> {
    let id = Identity::generate().map_err(runtime)?;
    id.save_new(out).map_err(|e| match e {
        punchd::IdentityError::Exists { .. } => usage(e),
        other => runtime(other),
    })?;
    eprintln!("wrote {} (keep it private); public key:", out.display());
    println!("{}", id.public_key());
    Ok(())
}

fn load(config: &Path) -> Result<(PeerConfig, Identity), Failure> {
    let cfg = PeerConfig::load(config).map_err(usage)?;
    let id = Identity::load(&cfg.key_file)
        .with_context(|| format!("{}: key_file", config.display()))
        .map_err(usage)?;
    if let Some(file) = &cfg.rendezvous.token_file {
        punch_service::secret_file::read_token(file)
            .with_context(|| format!("{}: rendezvous.token_file", config.display()))
            .map_err(usage)?;
    }
    Ok((cfg, id))
}

/// Which daemon a CLI command talks to, and where its admin token is.
struct AdminTarget {
    addr: SocketAddr,
    token_file: PathBuf,
}

impl AdminTarget {
    fn resolve(
        admin: Option<SocketAddr>,
        config: Option<&Path>,
        token_file: Option<PathBuf>,
    ) -> Result<Self, Failure> {
        let (addr, default_token) = match (admin, config) {
            (Some(a), _) => (a, punch_config::peer::default_token_path(a.port())),
            (None, Some(path)) => {
                let cfg = PeerConfig::load(path).map_err(usage)?;
                let addr = cfg
                    .admin
                    .listen_addr()
                    .context("admin.listen is not an address")
                    .map_err(usage)?;
                (addr, cfg.admin.token_path())
            }
            (None, None) => {
                let a: SocketAddr = punch_config::peer::DEFAULT_ADMIN_LISTEN
                    .parse()
                    .map_err(usage)?;
                (a, punch_config::peer::default_token_path(a.port()))
            }
        };
        Ok(Self {
            addr,
            token_file: token_file.unwrap_or(default_token),
        })
    }

    /// The token, if this user may read it.
    fn token(&self) -> Result<String, punch_service::secret_file::SecretFileError> {
        punch_service::secret_file::read_token(&self.token_file)
    }
}

fn repunch(target: &AdminTarget, peer: &str) -> Result<(), Failure> {
    let token = target
        .token()
        .context("cannot read the admin token; run as the daemon's user, or pass --token-file")
        .map_err(usage)?;
    let answer = tokio_runtime()?
        .block_on(punchd::admin::client::repunch(target.addr, peer, &token))
        .map_err(runtime)?;
    println!("{answer}");
    Ok(())
}

fn reload(target: &AdminTarget) -> Result<(), Failure> {
    let token = target
        .token()
        .context("cannot read the admin token; run as the daemon's user, or pass --token-file")
        .map_err(usage)?;
    let answer = tokio_runtime()?
        .block_on(punchd::admin::client::reload(target.addr, &token))
        .map_err(|e| match e {
            // The new file was refused: a config error, like check-config's.
            punchd::admin::client::StatusError::Refused(..) => usage(e),
            other => runtime(other),
        })?;
    println!("{answer}");
    Ok(())
}

fn man(out: Option<&Path>) -> Result<(), Failure> {
    match out {
        None => match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            // `punchd man | head`: the reader has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.context("cannot write the man page").map_err(runtime),
        },
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
                .with_context(|| format!("cannot write man pages into {}", dir.display()))
                .map_err(runtime)?;
            eprintln!("wrote man pages into {}", dir.display());
            Ok(())
        }
    }
}

fn status(target: &AdminTarget, json: bool) -> Result<(), Failure> {
    // Reads on loopback need no token; send it when we can read it so an
    // allow_remote daemon answers too.
    let token = target.token().ok();
    let doc = tokio_runtime()?
        .block_on(punchd::admin::client::fetch(target.addr, token.as_deref()))
        .map_err(runtime)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).map_err(runtime)?);
    } else {
        print!("{}", punchd::admin::client::render_table(&doc));
    }
    Ok(())
}

/// Without the `demo` feature the binary links no rendezvous server, so
/// there is nothing to embed.
#[cfg(not(feature = "demo"))]
fn demo(_verbose: bool) -> Result<(), Failure> {
    Err(usage(anyhow::anyhow!(
        "this punchd was built without the `demo` feature; rebuild with default features to run the demo"
    )))
}

#[cfg(feature = "demo")]
fn demo(verbose: bool) -> Result<(), Failure> {
    // Progress only for a person watching (a pipe gets just the report),
    // and not between log lines.
    let logging = verbose || std::env::var_os("RUST_LOG").is_some();
    let progress = (std::io::stderr().is_terminal() && !logging)
        .then(|| std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let report = tokio_runtime()?
        .block_on(async {
            let ticker = progress
                .clone()
                .map(|done| tokio::spawn(show_progress(done)));
            let report = punchd::demo::run_counting(progress.clone()).await;
            if let Some(t) = ticker {
                t.abort();
                eprint!("\r\x1b[2K");
            }
            report
        })
        .map_err(runtime)?;
    println!("{report}");
    if report.checksum_ok {
        Ok(())
    } else {
        Err(runtime(anyhow::anyhow!(
            "the echoed bytes differ from what was sent"
        )))
    }
}

/// Redraws one status line on stderr with the demo's echoed bytes.
#[cfg(feature = "demo")]
async fn show_progress(done: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::Write as _;
    let total = punchd::demo::DEMO_BYTES as f64 / (1024.0 * 1024.0);
    loop {
        let mib = done.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
        let phase = if mib > 0.0 { "echoing" } else { "punching" };
        eprint!("\r\x1b[2K  {phase} … {mib:.1} / {total:.0} MiB");
        let _ = std::io::stderr().flush();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run_daemon(config: &Path) -> Result<(), Failure> {
    let (cfg, id) = load(config)?;
    tokio_runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let daemon = punchd::start_from_file(config, cfg, id, cancel.clone())
            .await
            .map_err(|e| match e {
                punchd::DaemonError::Rendezvous(_)
                | punchd::DaemonError::TokenFile(_)
                | punchd::DaemonError::ServerKey => usage(e),
                other => runtime(other),
            })?;
        // Watch SIGHUP and SIGTERM before saying READY: a reload or a stop
        // sent right after must not meet the signal's default action (exit).
        let mut hangups = punch_service::reload_signals()
            .context("cannot watch for SIGHUP")
            .map_err(runtime)?;
        let shutdown = punch_service::shutdown_signal()
            .context("cannot watch for SIGTERM")
            .map_err(runtime)?;
        tokio::pin!(shutdown);
        punch_service::notify_ready("running");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(()) = hangups.recv() => {
                    // The outcome is logged by the daemon (summary, or the
                    // located error and "the running configuration stays").
                    punch_service::notify_reloading();
                    let _ = daemon.reload().await;
                    punch_service::notify_ready("running");
                }
            }
        }
        tracing::info!("shutdown requested; draining streams");
        punch_service::notify_stopping("draining streams");
        daemon.shutdown(Duration::from_secs(5)).await;
        Ok(())
    })
}
