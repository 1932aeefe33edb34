//! The lab's traffic: a sink that hashes what it receives and answers with
//! the sha256, and a sender that pushes checksummed streams through a
//! forward. Both run inside namespaces via `punch-lab-tool`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::punchd_types::{hex, pattern};
use crate::harness::spec::FORWARD_LISTEN;

/// Serves until killed: reads each connection to EOF, replies with the
/// sha256 of everything read and a newline.
pub async fn sink(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("sink cannot listen on {listen}"))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 128 * 1024];
            let mut got = 0u64;
            // One line per connection, how it ended (what an exposed
            // service saw): read by `sink_endings`.
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        got += n as u64;
                        hasher.update(&buf[..n]);
                    }
                    Err(e) => {
                        println!("{SINK_LINE} {got} error {e}");
                        return;
                    }
                }
            }
            println!("{SINK_LINE} {got} eof");
            let _ = s
                .write_all(format!("{}\n", hex(&hasher.finalize())).as_bytes())
                .await;
            let _ = s.shutdown().await;
        });
    }
}

/// How the sink's log lines about a connection's end start.
const SINK_LINE: &str = "sink connection ended after";

/// How one connection to the sink ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkEnding {
    /// Bytes it read.
    pub bytes: u64,
    /// A clean EOF (FIN) rather than an error (reset).
    pub clean: bool,
}

/// Every connection end the sink logged, in order.
pub fn sink_endings(log: &Path) -> Vec<SinkEnding> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix(SINK_LINE)?.split_whitespace();
            let bytes = w.next()?.parse().ok()?;
            Some(SinkEnding {
                bytes,
                clean: w.next()? == "eof",
            })
        })
        .collect()
}

/// Marks a sender stream that got a clean EOF (a FIN) instead of the
/// sink's answer: the truncation an application would take as complete.
pub const CLEAN_EOF: &str = "clean EOF without the sink's answer";

/// What one sender run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendReport {
    /// Bytes sent in total.
    pub bytes: u64,
    /// Streams used.
    pub streams: usize,
    /// Wall time for all streams.
    pub seconds: f64,
    /// Whether every stream's sha256 matched.
    pub ok: bool,
    /// Per-stream mismatches, if any.
    pub errors: Vec<String>,
}

async fn one_stream(connect: SocketAddr, data: Vec<u8>) -> Result<()> {
    let expected = hex(&Sha256::digest(&data));
    let mut s = TcpStream::connect(connect)
        .await
        .with_context(|| format!("connect {connect}"))?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let recv = async {
        let mut answer = String::new();
        r.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let ((), answer) = tokio::try_join!(send, recv)?;
    let answer = answer.trim();
    if answer.is_empty() {
        bail!("{CLEAN_EOF}");
    }
    if answer != expected {
        bail!("sha256 mismatch: sent {expected}, sink saw {answer:?}");
    }
    Ok(())
}

/// Sends `bytes` split over `streams` parallel connections to `connect`,
/// each checked against the sink's sha256.
pub async fn send(
    connect: SocketAddr,
    bytes: u64,
    streams: usize,
    text: Option<&str>,
) -> SendReport {
    let per = (bytes / streams.max(1) as u64) as usize;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..streams {
        let data = match text {
            // A recognizable plaintext, for checking what a capture can see.
            Some(t) if !t.is_empty() => t.as_bytes().iter().copied().cycle().take(per).collect(),
            _ => pattern(per, i as u64 + 1),
        };
        set.spawn(one_stream(connect, data));
    }
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    SendReport {
        bytes: per as u64 * streams as u64,
        streams,
        seconds: t0.elapsed().as_secs_f64(),
        ok: errors.is_empty(),
        errors,
    }
}

/// Serves until killed: echoes every byte back on each connection (the far
/// end of a request/response latency run).
pub async fn echo(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("echo cannot listen on {listen}"))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Request/response round trips over one connection, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RrReport {
    /// Round trips measured (after the warm-up).
    pub count: usize,
    /// Message size each way.
    pub size: usize,
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile round trip.
    pub p99_us: f64,
}

/// Sends `size` bytes and waits for them to come back, `count` times in a
/// row on one connection to an [`echo`] server (after `warmup` unmeasured
/// round trips): the latency a small request sees through a path.
pub async fn rr(connect: SocketAddr, count: usize, size: usize, warmup: usize) -> Result<RrReport> {
    let mut s = TcpStream::connect(connect)
        .await
        .with_context(|| format!("connect {connect}"))?;
    s.set_nodelay(true)?;
    let msg = pattern(size.max(1), 7);
    let mut back = vec![0u8; msg.len()];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t0 = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await.context("echo closed early")?;
        if back != msg {
            bail!("the echo answered different bytes");
        }
        if i >= warmup {
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(RrReport {
        count,
        size: msg.len(),
        p50_us: crate::harness::stats::percentile(&samples, 0.5),
        p99_us: crate::harness::stats::percentile(&samples, 0.99),
    })
}

/// The line a [`download`] opens with to get an endless stream from
/// [`echo_or_source`] instead of an echo.
const DOWNLOAD: &[u8] = b"DOWNLOAD\n";

/// Serves until killed: echoes every connection (for [`rr`]), except one
/// that opens with [`DOWNLOAD`], which gets the test pattern until it
/// closes. One service port for both, so a bulk transfer and a
/// request/response can share one punchd forward (the RTT bench's
/// "round trip under load").
pub async fn echo_or_source(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("echo cannot listen on {listen}"))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut first = vec![0u8; 256];
            let Ok(n) = s.read(&mut first).await else {
                return;
            };
            if first[..n].starts_with(DOWNLOAD) {
                let chunk = pattern(128 * 1024, 3);
                while s.write_all(&chunk).await.is_ok() {}
                return;
            }
            if s.write_all(&first[..n]).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// What a [`download`] received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadReport {
    /// Bytes received.
    pub bytes: u64,
    /// Seconds it ran.
    pub seconds: f64,
}

/// Downloads from an [`echo_or_source`] for `seconds`, discarding the
/// bytes: the bulk load under which the RTT bench measures [`rr`].
pub async fn download(connect: SocketAddr, seconds: f64) -> Result<DownloadReport> {
    let mut s = TcpStream::connect(connect)
        .await
        .with_context(|| format!("connect {connect}"))?;
    s.write_all(DOWNLOAD).await?;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        let left =
            std::time::Duration::from_secs_f64((seconds - t0.elapsed().as_secs_f64()).max(0.0));
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => bail!("the source closed after {bytes} bytes"),
            Ok(Ok(n)) => bytes += n as u64,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(DownloadReport {
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A minimal HTTP/1.0 request for the lab's own servers: returns the body
/// of a 2xx answer.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("{method} {path}: {}", head.lines().next().unwrap_or(""));
    }

    Ok(body.to_owned())
}

/// Runs the sender inside namespace `ns` through alice's forward. A free
/// function (names only), so it can run on another thread during a test.
pub fn transfer_in(
    ns: &str,
    tool: &Path,
    bytes: u64,
    streams: usize,
    text: Option<&str>,
) -> Result<SendReport> {
    let mut args = vec![
        "netns".to_owned(),
        "exec".into(),
        ns.into(),
        tool.display().to_string(),
        "send".into(),
        "--connect".into(),
        FORWARD_LISTEN.into(),
    ];
    args.extend([
        "--bytes".into(),
        bytes.to_string(),
        "--streams".into(),
        streams.to_string(),
    ]);
    if let Some(t) = text {
        args.extend(["--text".into(), t.to_owned()]);
    }
    let out = std::process::Command::new("ip")
        .args(&args)
        .output()
        .context("cannot run the sender")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "sender output: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sender_and_sink_agree() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let sink_task = tokio::spawn(sink(addr));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let report = send(addr, 4 * 1024 * 1024, 4, None).await;
        assert!(report.ok, "{:?}", report.errors);
        assert_eq!(report.bytes, 4 * 1024 * 1024);
        let report = send(addr, 100_000, 1, Some("marker")).await;
        assert!(report.ok, "{:?}", report.errors);
        assert_eq!(report.bytes, 100_000);

        sink_task.abort();
    }

    #[test]
    fn sink_endings_are_read_from_its_log() {
        let dir = std::env::temp_dir().join(format!("sink-endings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("sink.log");
        std::fs::write(
            &log,
            format!(
                "{SINK_LINE} 1048576 eof\nnoise\n{SINK_LINE} 17 error Connection reset by peer\n"
            ),
        )
        .unwrap();
        let e = sink_endings(&log);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            e,
            vec![
                SinkEnding {
                    bytes: 1_048_576,
                    clean: true
                },
                SinkEnding {
                    bytes: 17,
                    clean: false
                }
            ]
        );
    }

    #[test]
    fn patterns_differ_by_seed() {
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_eq!(pattern(10, 3).len(), 10);
    }
}
