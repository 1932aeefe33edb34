//! `punch-lab-tool`: the lab's helper, run inside namespaces by the tests
//! and by hand.
//!
//! - `sink --listen ADDR`: hash everything each connection sends, answer
//!   with the sha256.
//! - `send --connect ADDR --bytes N --streams K`: push checksummed streams,
//!   print a JSON report, exit 1 on any mismatch.
//! - `source --listen ADDR --bytes N` / `fetch --connect ADDR --bytes N
//!   --streams K`: downloads for the integrity suite; `fetch` prints each
//!   stream's outcome (intact, cut, truncated, corrupt, stalled) as JSON.
//! - `same-nat-stress --runs N`: the same-NAT punch racing the UDP
//!   observation, N times; exit 1 if one ends relayed or without QUIC.
//! - `run SCENARIO`: build one scenario by hand and keep it up until Enter
//!   (or Ctrl-C), printing how to look at it.
//! - `soak --minutes M`: the fault-injecting soak (`suites::soak`); its
//!   `soak-client` and `soak-serve` run inside namespaces.
//! - `cleanup`: remove every lab namespace.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "punchd NAT lab helper")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Hash what each connection sends and answer with the sha256.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Serve BYTES of the test pattern to every connection (downloads for
    /// the integrity suite); print how each connection ended.
    Source {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Download STREAMS copies from a `source` at once: prints JSON with
    /// each stream's outcome (intact, cut, truncated, corrupt, stalled).
    Fetch {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 4)]
        streams: usize,
        #[arg(long, default_value_t = 40)]
        deadline_secs: u64,
    },
    /// Echo every byte back (for `rr`).
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Request/response latency through a path to an `echo`: prints JSON.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Unmeasured round trips first.
        #[arg(long, default_value_t = 50)]
        warmup: usize,
    },
    /// Echo, except a connection that opens with `DOWNLOAD` gets an
    /// endless stream (the RTT bench's service).
    EchoOrSource {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Relay each connection to LISTEN on to TO, plain TCP, two blocking
    /// threads per connection (the bench's floor for any tunnel).
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Download from an `echo-or-source` for SECONDS: prints JSON.
    Download {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// SVG charts from the JSON of `bench --rtt --json`.
    BenchCharts {
        /// The bench's JSON.
        #[arg(long)]
        json: std::path::PathBuf,
        /// Where to write the SVGs.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Send checksummed streams through a forward.
    Send {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 64 * 1024 * 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 8)]
        streams: usize,
        /// Send this text repeated instead of pseudo-random bytes.
        #[arg(long)]
        text: Option<String>,
    },
    /// Build a scenario, punch, and keep it up for inspection.
    Run {
        /// masquerade, drop, rst, same-nat, public, double-nat, random
        scenario: String,
    },
    /// Run a scenario end to end with all its checks (as the lab tests
    /// do) and print the report; exit 1 if a check fails.
    Check {
        /// masquerade, drop, rst, same-nat, public, double-nat, random
        scenario: String,
        /// Run the rendezvous from this container image (podman) inside
        /// the lab instead of the workspace binary: deploy/test.sh.
        #[arg(long, value_name = "IMAGE")]
        rendezvous_image: Option<String>,
    },
    /// Same-NAT stress: RUNS back-to-back starts of two hosts behind one
    /// NAT (both transports), the punch racing the UDP observation; exit 1
    /// if any ends relayed.
    SameNatStress {
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// Remove every lab namespace.
    Cleanup,
    /// Throughput side by side in the lab: plain TCP vs punchd (iperf3).
    Bench {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The RTT axis instead: plain TCP, punchd TCP and QUIC, ssh -L and
        /// rathole at each of these round-trip times (ms, emulated on both
        /// NATs' links), and at 40 ms with 1 % loss.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        rtt: Option<Vec<u64>>,
        /// RTT axis: also write the figures as JSON here (for bench-charts).
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// RTT axis: a directory with another build's punchd and
        /// punch-rendezvous (e.g. main before a change), measured in the
        /// same run as rows "... (before)".
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
        /// RTT axis: only the TCP path (punchd TCP with plain TCP, ssh -L
        /// and rathole beside it, and the baseline's TCP row), for quick
        /// runs while tuning it.
        #[arg(long)]
        tcp_only: bool,
    },
    /// Punch timing: ROUNDS back-to-back re-punches in SCENARIO (two RST
    /// NATs by default) with alice A_MS and bob B_MS from the internet;
    /// prints SYN skew, first-attempt rate and punch time. Both delays 0:
    /// no link emulation at all.
    Punches {
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        #[arg(long, default_value_t = 5)]
        a_ms: u64,
        #[arg(long, default_value_t = 15)]
        b_ms: u64,
        #[arg(long, default_value = "rst")]
        scenario: String,
        /// Run N rendezvous instances sharing a real redis-server, alice
        /// and bob on different ones (every punch crosses instances).
        #[arg(long, default_value_t = 1)]
        cluster: usize,
    },
    /// Emulate a long, lossy link on this namespace's wan0 (run inside a
    /// NAT namespace after loading `linkem::ruleset()`); runs until killed.
    Linkem {
        /// QUEUE:DELAY_MS:JITTER_MS:LOSS_PCT, once per NFQUEUE to serve.
        #[arg(long = "queue", required = true)]
        queues: Vec<String>,
    },
    /// Register many signed clients with a rendezvous (and optionally have
    /// pairs of them request punches); prints a JSON report.
    Loadgen {
        /// A rendezvous; repeat it for instances sharing Redis (clients
        /// are spread round-robin, each pair across two instances).
        #[arg(long, required = true)]
        addr: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Pairs requesting punches back to back (0: just hold).
        #[arg(long, default_value_t = 0)]
        pairs: usize,
        /// How long to hold / to request punches, in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Number of the first client (names `load-N`…): load processes
        /// run side by side need distinct names, or they replace each other.
        #[arg(long, default_value_t = 0)]
        first: usize,
    },
    /// A rogue peer (`suites::attack`): registers as `mallory` claiming
    /// other hosts' addresses, asks for COUNT punches to PEER; prints JSON.
    Rogue {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        peer: String,
        #[arg(long, default_value_t = 6)]
        count: u32,
        #[arg(long, default_value_t = 400)]
        interval_ms: u64,
    },
    /// The fault-injecting soak: checked streams both ways while NATs are
    /// flushed, daemons and the rendezvous killed, links lose packets;
    /// prints the summary, exits 1 if it failed.
    Soak {
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Seed of the fault plan and the patterns (default: the clock).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 6)]
        streams: u32,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The soak's client (inside hostA): paced checked streams and probes
    /// through a forward, one JSON line per connection.
    SoakClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        streams: u32,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        stream_bytes: u64,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
        #[arg(long)]
        max_seconds: u64,
    },
    /// The soak's server (inside hostB): answers each stream's frames.
    SoakServe {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// HTTP GET on a plain-HTTP address; prints the body.
    Get {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
    },
}

fn main() -> ExitCode {
    use punch_lab::harness::transfer;
    match Cli::parse().cmd {
        Cmd::Sink { listen } => finish(runtime().block_on(transfer::sink(listen)), |()| ()),
        Cmd::Source { listen, bytes } => finish(
            runtime().block_on(punch_lab::suites::integrity::source(listen, bytes)),
            |()| (),
        ),
        Cmd::Fetch {
            connect,
            bytes,
            streams,
            deadline_secs,
        } => {
            print_json(runtime().block_on(punch_lab::suites::integrity::fetch(
                connect,
                bytes,
                streams,
                std::time::Duration::from_secs(deadline_secs),
            )));
            ExitCode::SUCCESS
        }
        Cmd::Echo { listen } => finish(runtime().block_on(transfer::echo(listen)), |()| ()),
        Cmd::Rr {
            connect,
            count,
            size,
            warmup,
        } => finish(
            runtime().block_on(transfer::rr(connect, count, size, warmup)),
            print_json,
        ),
        Cmd::EchoOrSource { listen } => {
            finish(runtime().block_on(transfer::echo_or_source(listen)), drop)
        }
        Cmd::Relay { listen, to } => finish(punch_lab::harness::relay::relay(listen, to), drop),
        Cmd::Download { connect, seconds } => finish(
            runtime().block_on(transfer::download(connect, seconds)),
            print_json,
        ),
        Cmd::BenchCharts { json, out } => finish(
            punch_lab::suites::bench::charts::write_charts(&json, &out),
            |files| {
                for f in files {
                    println!("{}", f.display());
                }
            },
        ),
        Cmd::Send {
            connect,
            bytes,
            streams,
            text,
        } => {
            let report =
                runtime().block_on(transfer::send(connect, bytes, streams, text.as_deref()));

            print_json(&report);
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Run { scenario } => by_hand(&scenario),
        Cmd::Check {
            scenario,
            rendezvous_image,
        } => check(&scenario, rendezvous_image.as_deref()),
        Cmd::SameNatStress { runs } => match prepare_scenario("same-nat") {
            Ok((_, bins)) => finish(
                punch_lab::suites::same_nat::none_relayed(&bins, runs),
                |line| println!("{line}"),
            ),
            Err(code) => code,
        },
        Cmd::Get { addr, path, method } => finish(
            runtime().block_on(transfer::http(addr, &method, &path)),
            |body| print!("{body}"),
        ),
        Cmd::Loadgen {
            addr,
            clients,
            pairs,
            seconds,
            first,
        } => finish(
            runtime().block_on(punch_lab::suites::loadgen::run(
                &addr,
                first..first + clients,
                pairs,
                std::time::Duration::from_secs(seconds),
            )),
            print_json,
        ),
        Cmd::Rogue {
            addr,
            peer,
            count,
            interval_ms,
        } => finish(
            runtime().block_on(punch_lab::suites::attack::rogue(
                addr,
                &peer,
                count,
                std::time::Duration::from_millis(interval_ms),
            )),
            print_json,
        ),
        Cmd::Linkem { queues } => {
            use punch_lab::net::linkem::{run, Impairment};
            let parsed: Result<Vec<_>, _> =
                queues.iter().map(|q| Impairment::parse_spec(q)).collect();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            finish(parsed.and_then(|q| run(&q, stop)), |()| ())
        }
        Cmd::Punches {
            rounds,
            a_ms,
            b_ms,
            scenario,
            cluster,
        } => {
            use punch_lab::net::topology::{Link, Links};
            let (mut s, bins) = match prepare_scenario(&scenario) {
                Ok(v) => v,
                Err(code) => return code,
            };
            if cluster > 1 {
                s = s.with_cluster(cluster);
            }
            if a_ms + b_ms > 0 {
                s = s.with_links(Links {
                    a: Link::symmetric_ms(a_ms),
                    b: Link::symmetric_ms(b_ms),
                    rv: Link::NONE,
                });
            }
            // A punch that never ended direct is a measured failure: the
            // figures are printed and the run exits non-zero.
            let timing = punch_lab::suites::realism::timing("punches", s, rounds, &bins);
            if let Some(t) = timing.as_ref().ok().filter(|t| t.failed > 0) {
                println!(
                    "punch timing, RTT {} ms ({a_ms} ms / {b_ms} ms), {scenario}: {t}",
                    2 * (a_ms + b_ms)
                );
                eprintln!(
                    "error: {} of {} punches never ended direct",
                    t.failed, t.rounds
                );
                return ExitCode::from(1);
            }
            finish(timing, |t| {
                println!(
                    "punch timing, RTT {} ms ({a_ms} ms / {b_ms} ms), {scenario}: {t}",
                    2 * (a_ms + b_ms)
                );
            })
        }
        Cmd::Bench {
            seconds,
            rtt,
            json,
            baseline,
            tcp_only,
        } => {
            if let Some(why) = punch_lab::harness::preflight::unavailable() {
                eprintln!("error: {why}");
                return ExitCode::from(2);
            }
            punch_lab::harness::preflight::cleanup_on_ctrl_c();
            let result = std::env::current_exe()
                .map_err(anyhow::Error::from)
                .and_then(|p| punch_lab::harness::Binaries::beside(&p))
                .and_then(|bins| match rtt {
                    Some(rtts) => punch_lab::suites::bench::rtt::run(
                        &bins,
                        &punch_lab::suites::bench::rtt::Options {
                            seconds,
                            rtts: if rtts.is_empty() {
                                punch_lab::suites::bench::rtt::DEFAULT_RTTS.to_vec()
                            } else {
                                rtts
                            },
                            json,
                            baseline,
                            tcp_only,
                        },
                    ),
                    None => punch_lab::suites::bench::run(&bins, seconds),
                });
            finish(result, |()| ())
        }
        Cmd::Soak {
            minutes,
            seed,
            streams,
            json,
        } => soak(minutes, seed, streams, json),
        Cmd::SoakClient {
            connect,
            streams,
            rate,
            stream_bytes,
            seed,
            stop_file,
            max_seconds,
        } => {
            use punch_lab::suites::soak::stream::{client, ClientOpts};
            let o = ClientOpts {
                connect,
                streams,
                rate,
                stream_bytes,
                stop_file,
                max: std::time::Duration::from_secs(max_seconds),
                seed,
            };
            finish(runtime().block_on(client(o)), |()| ())
        }
        Cmd::SoakServe { listen } => finish(
            runtime().block_on(punch_lab::suites::soak::stream::serve(listen)),
            |()| (),
        ),
        Cmd::Cleanup => {
            punch_lab::net::netns::cleanup();
            ExitCode::SUCCESS
        }
    }
}

/// Exit 0 after `ok` has printed the result, or print the error and exit 1.
fn finish<T>(result: anyhow::Result<T>, ok: impl FnOnce(T)) -> ExitCode {
    match result {
        Ok(v) => {
            ok(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A report as one line of JSON on stdout (what bench.sh and the lab read).
fn print_json<T: serde::Serialize>(report: T) {
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1)
        }
    }
}

/// The named scenario and the binaries beside this tool, ready to run in
/// the lab; or the exit code that says why not.
fn prepare_scenario(
    name: &str,
) -> Result<(punch_lab::harness::Scenario, punch_lab::harness::Binaries), ExitCode> {
    let Some(scenario) = punch_lab::harness::matrix::by_name(name) else {
        eprintln!(
            "error: unknown scenario {name:?}; one of: {}",
            punch_lab::harness::matrix::scenarios()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Err(ExitCode::from(2));
    };
    if let Some(why) = punch_lab::harness::preflight::unavailable() {
        eprintln!("error: {why}");
        return Err(ExitCode::from(2));
    }
    punch_lab::harness::preflight::cleanup_on_ctrl_c();
    match std::env::current_exe()
        .map_err(anyhow::Error::from)
        .and_then(|p| punch_lab::harness::Binaries::beside(&p))
    {
        Ok(bins) => Ok((scenario, bins)),
        Err(e) => {
            eprintln!("error: {e:#}");
            Err(ExitCode::from(1))
        }
    }
}

fn check(name: &str, rendezvous_image: Option<&str>) -> ExitCode {
    let (mut scenario, bins) = match prepare_scenario(name) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if let Some(image) = rendezvous_image {
        scenario = scenario.with_rendezvous_image(image);
    }
    finish(
        punch_lab::suites::scenarios::run(&scenario, &bins),
        |report| println!("{report}"),
    )
}

fn soak(minutes: f64, seed: Option<u64>, streams: u32, json: bool) -> ExitCode {
    use punch_lab::suites::soak;
    if let Some(why) = punch_lab::harness::preflight::unavailable() {
        eprintln!("error: {why}");
        return ExitCode::from(2);
    }
    punch_lab::harness::preflight::cleanup_on_ctrl_c();
    let duration = std::time::Duration::from_secs_f64(minutes.max(0.5) * 60.0);
    let mut o = soak::Options::new(duration, seed.unwrap_or_else(soak::clock_seed));
    o.streams = streams.clamp(1, 64);
    let result = std::env::current_exe()
        .map_err(anyhow::Error::from)
        .and_then(|p| punch_lab::harness::Binaries::beside(&p))
        .and_then(|bins| soak::run(&bins, &o));
    match result {
        Ok(summary) => {
            if json {
                print_json(&summary);
            } else {
                println!("{summary}");
            }
            if summary.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn by_hand(name: &str) -> ExitCode {
    use punch_lab::harness::Run;
    let (scenario, bins) = match prepare_scenario(name) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let run = match Run::start(&scenario, &bins) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let p = run.topo.prefix().to_owned();
    println!(
        "scenario {name} is up; logs and configs in {}",
        run.dir.display()
    );
    println!(
        "  status:  ip netns exec {p}hostA {} status",
        bins.punchd.display()
    );
    println!("  capture: ip netns exec {p}inet tcpdump -ni br0 tcp port 40000");
    println!("  send:    ip netns exec {p}hostA {} send --connect 127.0.0.1:10000 --bytes 1000000 --streams 1", bins.tool.display());
    println!("press Enter to tear it down");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(run);
    ExitCode::SUCCESS
}
