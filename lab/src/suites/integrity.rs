//! Integrity when a tunnel is cut mid-stream: several downloads through
//! alice's forward while the path breaks, on the TCP, QUIC and relayed
//! paths. Every local client must either receive everything intact
//! (sha256) or get an error: never a clean EOF on fewer bytes, never
//! different bytes, never a hang. The exposed service's side is checked
//! too: its connection must end in a reset, not a FIN, when cut.
//!
//! Cuts, one after another on one run per path (the tunnel must be working
//! again between them): NAT state flushed (`conntrack -F` on every NAT),
//! the path blackholed (everything forwarded through alice's NAT dropped
//! until the downloads ended), and bob SIGKILLed (last).
//!
//! Before stream data was framed with an end marker, a flushed NAT ended
//! 2 of 3 256 MiB downloads in a clean EOF after 51.8 and 58.7 MB.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::punchd_types::{hex, pattern, PathState, Transport};
use crate::harness::run::wait;
use crate::harness::spec::{FORWARD_LISTEN, SINK_LISTEN};
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::topology::{Layout, Links};

/// Seed of the bytes the source serves (the client checks against it).
const SEED: u64 = 17;

/// How one download ended, seen by the local client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every byte, and the right ones.
    Intact,
    /// An error (reset, connection refused) after this many bytes: the
    /// application knows the download failed.
    Cut(u64),
    /// A clean EOF after fewer bytes than served: silent truncation.
    Truncated(u64),
    /// All bytes (or more) but different ones.
    Corrupt,
    /// Nothing for the client's whole deadline.
    Stalled(u64),
}

/// The verdict on one download: what arrived, and how the stream ended
/// (`Ok` = a clean EOF). Pure, so the rules are tested without a lab.
pub fn classify(expected: &[u8], got_len: u64, got_sha: &str, end: Result<(), ()>) -> Outcome {
    let want = expected.len() as u64;
    match end {
        Err(()) => Outcome::Cut(got_len),
        Ok(()) if got_len < want => Outcome::Truncated(got_len),
        Ok(()) if got_len == want && got_sha == hex(&Sha256::digest(expected)) => Outcome::Intact,
        Ok(()) => Outcome::Corrupt,
    }
}

/// What one `fetch` run saw, per stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchReport {
    /// Bytes each stream should get.
    pub bytes: u64,
    /// Each stream's outcome.
    pub outcomes: Vec<Outcome>,
}

impl FetchReport {
    /// Streams that ended silently short, corrupt or stalled.
    pub fn bad(&self) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| !matches!(o, Outcome::Intact | Outcome::Cut(_)))
            .collect()
    }

    /// Streams that got an error.
    pub fn cut(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Cut(_)))
            .count()
    }
}

/// Serves until killed: writes `bytes` of the pattern to each connection,
/// then half-closes; prints one line per connection with how it ended
/// (`complete`, `reset` or `fin-early`: the tunnel side closed cleanly
/// before the download was over, what a cut must never look like).
pub async fn source(listen: SocketAddr, bytes: u64) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("source cannot listen on {listen}"))?;
    let data = std::sync::Arc::new(pattern(bytes as usize, SEED));
    loop {
        let (s, _) = listener.accept().await?;
        let data = data.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            // The tunnel side sends nothing: its read half ends with a FIN
            // (`None`) or an error.
            let read = async move {
                let mut buf = [0u8; 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) => return None,
                        Ok(_) => {}
                        Err(e) => return Some(e),
                    }
                }
            };
            tokio::pin!(read);
            let write = async {
                for chunk in data.chunks(64 * 1024) {
                    w.write_all(chunk).await?;
                }
                w.shutdown().await
            };
            // The first half to see the end decides: Linux reports a
            // reset once, to whichever call comes first.
            let how = tokio::select! {
                written = write => match written {
                    Err(_) => "reset",
                    Ok(()) => match (&mut read).await {
                        None => "complete",
                        Some(_) => "reset",
                    },
                },
                end = &mut read => match end {
                    None => "fin-early",
                    Some(_) => "reset",
                },
            };
            println!("{how}");
        });
    }
}

/// Downloads `streams` copies of the source's bytes through `connect` at
/// once; each must end within `deadline`.
pub async fn fetch(
    connect: SocketAddr,
    bytes: u64,
    streams: usize,
    deadline: Duration,
) -> FetchReport {
    let expected = std::sync::Arc::new(pattern(bytes as usize, SEED));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let expected = expected.clone();
        set.spawn(async move {
            let mut got = 0u64;
            let mut hasher = Sha256::new();
            let read = async {
                let mut s = TcpStream::connect(connect).await.map_err(|_| ())?;
                let mut buf = vec![0u8; 128 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            got += n as u64;
                        }
                        Err(_) => return Err(()),
                    }
                }
            };
            match tokio::time::timeout(deadline, read).await {
                Ok(end) => classify(&expected, got, &hex(&hasher.finalize()), end),
                Err(_) => Outcome::Stalled(got),
            }
        });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = set.join_next().await {
        outcomes.push(r.unwrap_or(Outcome::Stalled(0)));
    }
    FetchReport { bytes, outcomes }
}

/// Which path a run cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Timed TCP simultaneous open through plain NATs.
    Tcp,
    /// UDP punch + QUIC ([`Links::near`], see lab/README.md).
    Quic,
    /// Port-randomizing NATs: the relay through the rendezvous.
    Relayed,
}

/// A way to cut the path in the middle of the downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// `conntrack -F` on every NAT.
    Flush,
    /// Everything forwarded through alice's NAT dropped until the
    /// downloads ended.
    Blackhole,
    /// bob SIGKILLed.
    KillPeer,
}

/// Concurrent downloads per cut.
const STREAMS: usize = 4;
/// nftables table that blackholes alice's NAT.
const HOLE: &str = "integrity_hole";
/// How long one download may take before it counts as stalled: past
/// every keepalive timeout (TCP 5 s, QUIC 10 s) with margin.
const DEADLINE: Duration = Duration::from_secs(40);

fn scenario(path: Over) -> Scenario {
    match path {
        Over::Tcp => Scenario::new(
            "integ-tcp",
            Layout::TwoNats(NatBehaviour::Masquerade),
            Expect::Direct,
        ),
        Over::Quic => Scenario::new(
            "integ-quic",
            Layout::TwoNats(NatBehaviour::Masquerade),
            Expect::Direct,
        )
        .with_transports(&[Transport::Quic])
        .with_links(Links::near()),
        Over::Relayed => Scenario::new(
            "integ-relay",
            Layout::TwoNats(NatBehaviour::RandomFully),
            Expect::Relayed,
        )
        .with_timeout("3s")
        .with_transports(&[Transport::Tcp, Transport::Quic]),
    }
}

/// Bytes per download: enough that each is in flight when the cut hits
/// (the relay carries 8 MiB/s per session by default).
fn per_stream(path: Over) -> u64 {
    match path {
        Over::Tcp | Over::Quic => 128 * 1024 * 1024,
        Over::Relayed => 16 * 1024 * 1024,
    }
}

/// `fetch` inside alice's host through her forward (a free function on
/// names, so it can run on another thread).
fn fetch_in(ns: &str, tool: &Path, bytes: u64, streams: usize) -> Result<FetchReport> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(tool)
        .args(["fetch", "--connect", FORWARD_LISTEN])
        .args(["--bytes", &bytes.to_string()])
        .args(["--streams", &streams.to_string()])
        .args(["--deadline-secs", &DEADLINE.as_secs().to_string()])
        .output()
        .context("cannot run fetch")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "fetch output: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Replaces bob's sink with the download source on the same address.
fn serve_downloads(run: &mut Run, bytes: u64) -> Result<()> {
    run.topo.host_b.kill(run.sink);
    let log = run.dir.join("source.log");
    let tool = run.bins().tool.clone();
    run.sink = run.topo.host_b.spawn(
        &tool,
        &[
            "source",
            "--listen",
            SINK_LISTEN,
            "--bytes",
            &bytes.to_string(),
        ],
        &[],
        &log,
    )?;
    let ns = run.topo.host_b.name().to_owned();
    let port = SINK_LISTEN.rsplit(':').next().unwrap_or("9000").parse()?;
    wait("the source to listen", Duration::from_secs(10), || {
        crate::net::netns::listens_on(&ns, port).then_some(())
    })
}

/// Lines of the source's log: how each served connection ended.
fn source_ends(run: &Run) -> Vec<String> {
    std::fs::read_to_string(run.dir.join("source.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs every cut on `path`; returns a line per cut.
pub fn cuts(bins: &Binaries, path: Over) -> Result<String> {
    let s = scenario(path);
    let mut run = Run::start(&s, bins)?;
    let result = cuts_on(&mut run, path);
    result.map_err(|e| run.explain(e))
}

fn cuts_on(run: &mut Run, path: Over) -> Result<String> {
    let bytes = per_stream(path);
    let want = match path {
        Over::Relayed => PathState::Relayed,
        _ => PathState::Direct,
    };
    run.wait_path("alice", want, Duration::from_secs(60))?;
    serve_downloads(run, bytes)?;
    let mut lines = Vec::new();
    for cut in [Cut::Flush, Cut::Blackhole, Cut::KillPeer] {
        let ns = run.topo.host_a.name().to_owned();
        let tool = run.bins().tool.clone();
        let bg = std::thread::spawn(move || fetch_in(&ns, &tool, bytes, STREAMS));
        // The cut must hit while every download is running.
        wait(
            "the downloads to be running",
            Duration::from_secs(30),
            || {
                run.status("alice").ok().filter(|d| {
                    d.forwards
                        .first()
                        .is_some_and(|f| f.active as usize >= STREAMS)
                })
            },
        )?;
        std::thread::sleep(Duration::from_millis(400));
        let cut_at = Instant::now();
        match cut {
            Cut::Flush => {
                for nat in &run.topo.nats {
                    nat.exec("conntrack", &["-F"])?;
                }
            }
            Cut::Blackhole => run.topo.nats[0].nft(&format!(
                "table inet {HOLE} {{\n chain hole {{\n  type filter hook forward priority -10;\n  drop\n }}\n}}\n"
            ))?,
            Cut::KillPeer => {
                // Every connection the exposed service saw cut so far
                // ended in a reset, none in a FIN. (From here on bob's
                // kernel closes them when he dies: a FIN that is not
                // punchd's.)
                let ends = source_ends(run);
                if ends.iter().any(|e| e == "fin-early") {
                    bail!("{path:?}: the exposed service saw a FIN on a cut download: {ends:?}");
                }
                run.topo.host_b.kill(run.bob);
            }
        }
        let report = bg
            .join()
            .map_err(|_| anyhow::anyhow!("fetch thread panicked"))??;
        let ended_after = cut_at.elapsed();
        if cut == Cut::Blackhole {
            run.topo.nats[0].exec("nft", &["delete", "table", "inet", HOLE])?;
        }
        let bad = report.bad();
        if !bad.is_empty() {
            bail!(
                "{path:?} {cut:?}: downloads ended silently short, corrupt or stalled: {:?}",
                report.outcomes
            );
        }
        // A killed peer or a blackhole longer than the keepalive timeout
        // must break the downloads: if none was cut, the cut missed them.
        if cut != Cut::Flush && report.cut() == 0 {
            bail!("{path:?} {cut:?}: every download survived; the cut did not hit them");
        }
        lines.push(format!(
            "{cut:?}: {} intact, {} cut (all ended {:.1} s after the cut)",
            STREAMS - report.cut(),
            report.cut(),
            ended_after.as_secs_f64()
        ));
        if cut != Cut::KillPeer {
            until_download_works(run, want, bytes)?;
        }
    }
    let ends = source_ends(run);
    let resets = ends.iter().filter(|e| *e == "reset").count();
    Ok(format!(
        "{path:?}: {}; the service saw {resets} resets, {} complete, 0 FIN on a cut before the kill",
        lines.join("; "),
        ends.iter().filter(|e| *e == "complete").count()
    ))
}

/// Waits for a working tunnel of the expected kind again (one download
/// intact).
fn until_download_works(run: &Run, want: PathState, bytes: u64) -> Result<()> {
    let ns = run.topo.host_a.name().to_owned();
    let tool = run.bins().tool.clone();
    wait(
        "a working tunnel after the cut",
        Duration::from_secs(60),
        || {
            let ok = run
                .status("alice")
                .is_ok_and(|d| d.peers.first().is_some_and(|p| p.path == want));
            ok.then(|| fetch_in(&ns, &tool, bytes, 1).ok())
                .flatten()
                .filter(|r| r.outcomes.iter().all(|o| *o == Outcome::Intact))
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_clean_eof_is_truncation_and_an_error_is_a_cut() {
        let data = pattern(1000, SEED);
        let sha = hex(&Sha256::digest(&data));
        assert_eq!(classify(&data, 1000, &sha, Ok(())), Outcome::Intact);
        assert_eq!(classify(&data, 400, "x", Ok(())), Outcome::Truncated(400));
        assert_eq!(classify(&data, 400, "x", Err(())), Outcome::Cut(400));
        assert_eq!(classify(&data, 1000, "x", Ok(())), Outcome::Corrupt);
        assert_eq!(classify(&data, 1001, "x", Ok(())), Outcome::Corrupt);
    }

    #[tokio::test]
    async fn fetch_and_source_agree() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let src = tokio::spawn(source(addr, 1_000_000));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = fetch(addr, 1_000_000, 3, Duration::from_secs(10)).await;
        assert_eq!(r.outcomes, vec![Outcome::Intact; 3]);
        src.abort();
    }
}
