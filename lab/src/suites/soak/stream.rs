//! The soak's traffic: streams whose every byte the receiver can check,
//! and whose end it can tell from a cut.
//!
//! Each direction of a connection is a 28-byte header (magic, seed, slot,
//! sequence number) and then frames: a u32 length and that many bytes of
//! the seed's deterministic pattern, continuing across frames; a frame of
//! length 0 is the end, after which the sender half-closes. So a receiver
//! regenerates what it should get and counts every byte that differs
//! (**corrupted**), and a clean EOF before the end frame is a stream
//! **silently truncated**: the far end closed as if all was sent when it
//! was not — what a forward must never do (a cut stream must end in a
//! reset, so the application knows). An I/O error is a **reset**; no byte
//! for [`STALL`] is a **stall**.
//!
//! The client (in alice's host, through her forward) paces each stream
//! and ends it after a length or when told to stop; the server (in bob's
//! host, behind his expose) answers every frame with one of its own
//! pattern, so bytes flow both ways at the client's rate. Both print one
//! JSON [`End`] per connection on stdout. When a side gives up on a
//! connection it closes it with a RST (linger 0), so its own abort is
//! never mistaken for a truncation at the far end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::schedule::Rng;

/// First bytes of every header.
pub const MAGIC: [u8; 8] = *b"PSOAK01\n";
const HEADER_LEN: usize = 28;
/// Bytes per data frame (and the largest a receiver accepts).
pub const FRAME: usize = 16 * 1024;
/// The server's seed is the client's XOR this, so the two directions
/// carry different bytes.
const ANSWER: u64 = 0xA5A5_5A5A_0F0F_F0F0;
/// No byte received for this long: the stream is stalled, and given up.
pub const STALL: Duration = Duration::from_secs(20);
/// How long the server waits on an idle connection before giving up
/// (the client's [`STALL`] is what decides; this only bounds the task).
const SERVER_IDLE: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch: the one clock the soak's processes
/// (client, server, the runner's fault log) share.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The deterministic bytes of one direction, generated in order.
#[derive(Debug, Clone)]
pub struct Pattern {
    rng: Rng,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The pattern of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            word: [0; 8],
            used: 8,
        }
    }

    /// The next `out.len()` bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.word = self.rng.next_u64().to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Checks received bytes against the pattern they should follow.
#[derive(Debug, Clone)]
pub struct Verifier {
    pattern: Pattern,
    expect: Vec<u8>,
    /// Bytes checked.
    pub bytes: u64,
    /// Bytes that differed from the pattern.
    pub corrupted: u64,
}

impl Verifier {
    /// A verifier for the pattern of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            pattern: Pattern::new(seed),
            expect: Vec::new(),
            bytes: 0,
            corrupted: 0,
        }
    }

    /// Checks the next received bytes.
    pub fn check(&mut self, got: &[u8]) {
        self.expect.resize(got.len(), 0);
        self.pattern.fill(&mut self.expect);
        self.corrupted += got.iter().zip(&self.expect).filter(|(a, b)| a != b).count() as u64;
        self.bytes += got.len() as u64;
    }
}

/// How a connection (or one side's view of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Both end frames arrived, then EOF: every byte was checked.
    Complete,
    /// A clean EOF before the end frame.
    Truncated,
    /// An I/O error (a reset, usually).
    Reset,
    /// Nothing received for [`STALL`].
    Stalled,
    /// Bytes that differ from the pattern, a bad header or frame length,
    /// or bytes after the end frame.
    Corrupt,
    /// The connection could not be opened (the forward is not listening).
    Refused,
}

/// Which process saw the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seen {
    /// The client, through alice's forward.
    Client,
    /// The server, behind bob's expose.
    Server,
}

/// One connection's end, as printed (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    /// Who saw it.
    pub seen: Seen,
    /// A probe (short, for recovery timing) rather than a long stream.
    pub probe: bool,
    /// The client's stream slot.
    pub slot: u32,
    /// The slot's connection number.
    pub seq: u64,
    /// When it was opened (or the connect tried), Unix ms.
    pub opened_ms: u64,
    /// When it ended, Unix ms.
    pub at_ms: u64,
    /// Pattern bytes this side wrote.
    pub sent: u64,
    /// Pattern bytes this side received and checked.
    pub received: u64,
    /// Of those, how many differed.
    pub corrupted: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The error, if any.
    #[serde(default)]
    pub error: String,
}

impl End {
    /// A connection that has just begun (complete until found otherwise).
    fn begun(seen: Seen, probe: bool, slot: u32, seq: u64) -> Self {
        let opened_ms = now_ms();
        Self {
            seen,
            probe,
            slot,
            seq,
            opened_ms,
            at_ms: opened_ms,
            sent: 0,
            received: 0,
            corrupted: 0,
            outcome: Outcome::Complete,
            error: String::new(),
        }
    }

    /// Fills in what an exchange moved and how it ended, and the time.
    fn finish(&mut self, sent: u64, v: &Verifier, result: Result<(), Failure>) {
        self.sent = sent;
        self.received = v.bytes;
        self.corrupted = v.corrupted;
        self.at_ms = now_ms();
        if let Err((outcome, error)) = result {
            self.outcome = outcome;
            self.error = error;
        }
    }
}

/// A direction's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    seed: u64,
    slot: u32,
    seq: u64,
}

/// Set in a probe's seed.
const PROBE_BIT: u64 = 1 << 63;

impl Header {
    fn encode(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.seed.to_be_bytes());
        b[16..20].copy_from_slice(&self.slot.to_be_bytes());
        b[20..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Option<Self> {
        (b[..8] == MAGIC).then(|| Self {
            seed: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            slot: u32::from_be_bytes(b[16..20].try_into().unwrap_or_default()),
            seq: u64::from_be_bytes(b[20..].try_into().unwrap_or_default()),
        })
    }

    /// The header the server answers with.
    fn answer(self) -> Self {
        Self {
            seed: self.seed ^ ANSWER,
            ..self
        }
    }
}

/// What went wrong on one side, and the bytes it had moved.
type Failure = (Outcome, String);

fn io_outcome(e: &std::io::Error) -> Outcome {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Outcome::Truncated
    } else {
        Outcome::Reset
    }
}

async fn read_exact_within<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    stall: Duration,
) -> Result<(), Failure> {
    match tokio::time::timeout(stall, r.read_exact(buf)).await {
        Err(_) => Err((Outcome::Stalled, format!("nothing for {stall:?}"))),
        Ok(Err(e)) => Err((io_outcome(&e), e.to_string())),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn read_header<R: AsyncRead + Unpin>(r: &mut R, stall: Duration) -> Result<Header, Failure> {
    let mut b = [0u8; HEADER_LEN];
    read_exact_within(r, &mut b, stall).await?;
    Header::decode(&b).ok_or((Outcome::Corrupt, "bad header magic".to_owned()))
}

/// Reads frames to the end frame and then EOF, checking every byte of the
/// pattern of `seed`; tells `mirror` each frame's length (0 for the end)
/// if given.
async fn receive<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    stall: Duration,
    mirror: Option<&mpsc::Sender<usize>>,
    v: &mut Verifier,
) -> Result<(), Failure> {
    *v = Verifier::new(seed);
    let mut buf = vec![0u8; FRAME];
    loop {
        let mut len = [0u8; 4];
        read_exact_within(r, &mut len, stall).await?;
        let n = u32::from_be_bytes(len) as usize;
        if n > FRAME {
            return Err((Outcome::Corrupt, format!("frame length {n}")));
        }
        if n == 0 {
            break;
        }
        read_exact_within(r, &mut buf[..n], stall).await?;
        v.check(&buf[..n]);
        if v.corrupted > 0 {
            return Err((Outcome::Corrupt, format!("{} bytes differ", v.corrupted)));
        }
        if let Some(m) = mirror {
            let _ = m.send(n).await;
        }
    }
    if let Some(m) = mirror {
        let _ = m.send(0).await;
    }
    match tokio::time::timeout(stall, r.read(&mut buf)).await {
        Err(_) => Err((Outcome::Stalled, "no EOF after the end frame".to_owned())),
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => {
            v.corrupted += n as u64;
            Err((Outcome::Corrupt, format!("{n} bytes after the end frame")))
        }
        Ok(Err(e)) => Err((Outcome::Reset, format!("after the end frame: {e}"))),
    }
}

/// Writes `header`, then a frame of the pattern for each length `sizes`
/// gives, then the end frame (on a 0 or when `sizes` closes) and a
/// half-close. Counts the pattern bytes written into `sent`.
async fn transmit<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: Header,
    mut sizes: mpsc::Receiver<usize>,
    sent: &mut u64,
) -> Result<(), Failure> {
    let fail = |e: std::io::Error| (Outcome::Reset, e.to_string());
    w.write_all(&header.encode()).await.map_err(fail)?;
    let mut pattern = Pattern::new(header.seed);
    let mut buf = vec![0u8; 4 + FRAME];
    while let Some(n) = sizes.recv().await {
        let n = n.min(FRAME);
        if n == 0 {
            break;
        }
        buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
        pattern.fill(&mut buf[4..4 + n]);
        w.write_all(&buf[..4 + n]).await.map_err(fail)?;
        *sent += n as u64;
    }
    w.write_all(&0u32.to_be_bytes()).await.map_err(fail)?;
    w.shutdown().await.map_err(fail)
}

/// The outcome of both halves of a connection: the first failure, or
/// complete.
fn first_failure(a: Result<(), Failure>, b: Result<(), Failure>) -> Result<(), Failure> {
    a.and(b)
}

/// Runs `send` and `recv` on one stream at once; as soon as either fails
/// the connection is closed with a RST. Returns (sent, verifier, result).
async fn exchange(
    mut s: TcpStream,
    header: Header,
    expect: Option<Header>,
    sizes: mpsc::Receiver<usize>,
    mirror: Option<mpsc::Sender<usize>>,
    stall: Duration,
) -> (u64, Verifier, Result<(), Failure>) {
    let mut sent = 0u64;
    let mut v = Verifier::new(0);
    let result = {
        let (mut r, mut w) = s.split();
        let send = transmit(&mut w, header, sizes, &mut sent);
        let recv = async {
            if let Some(want) = expect {
                let got = read_header(&mut r, stall).await?;
                if got != want {
                    return Err((Outcome::Corrupt, format!("answer header {got:?}")));
                }
            }
            let seed = expect.map_or(header.seed ^ ANSWER, |h| h.seed);
            receive(&mut r, seed, stall, mirror.as_ref(), &mut v).await
        };
        tokio::pin!(send, recv);
        let (mut sr, mut rr) = (None, None);
        while sr.is_none() || rr.is_none() {
            tokio::select! {
                x = &mut send, if sr.is_none() => {
                    let failed = x.is_err();
                    sr = Some(x);
                    if failed { break; }
                }
                x = &mut recv, if rr.is_none() => {
                    let failed = x.is_err();
                    rr = Some(x);
                    if failed { break; }
                }
            }
        }
        first_failure(rr.unwrap_or(Ok(())), sr.unwrap_or(Ok(())))
    };
    if result.is_err() {
        reset_on_close(&s);
    }
    (sent, v, result)
}

/// Makes closing `s` send a RST (linger 0), so a side that gives up on a
/// connection is never mistaken for a clean end at the far side. The
/// deprecation is about a blocking close with a non-zero linger; with zero
/// the kernel resets at once.
#[allow(deprecated)]
fn reset_on_close(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

fn print_end(e: &End) {
    if let Ok(line) = serde_json::to_string(e) {
        println!("{line}");
    }
}

/// What the client does.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// alice's forward.
    pub connect: SocketAddr,
    /// Streams open at once.
    pub streams: u32,
    /// Each stream's rate each way, bytes per second.
    pub rate: u64,
    /// Bytes each way after which a stream ends and its slot opens the
    /// next one.
    pub stream_bytes: u64,
    /// Stop when this file appears (the runner's signal) ...
    pub stop_file: Option<PathBuf>,
    /// ... or after this long at the most.
    pub max: Duration,
    /// Seeds every stream's pattern.
    pub seed: u64,
}

/// How often a probe starts.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A probe that has not completed in this long failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One client connection: open, exchange, print its [`End`].
async fn one(
    connect: SocketAddr,
    header: Header,
    frames: u64,
    gap: Duration,
    stop: Arc<AtomicBool>,
) -> End {
    let probe = header.seed & PROBE_BIT != 0;
    let mut end = End::begun(Seen::Client, probe, header.slot, header.seq);
    let s = match TcpStream::connect(connect).await {
        Ok(s) => s,
        Err(e) => {
            end.finish(0, &Verifier::new(0), Err((Outcome::Refused, e.to_string())));
            return end;
        }
    };
    let _ = s.set_nodelay(true);
    let (tx, rx) = mpsc::channel(8);
    // The pacer: one frame every `gap` until `frames` or the stop, then the
    // end. It ends by itself when the connection is gone (send fails).
    let pacer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(gap);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..frames {
            tick.tick().await;
            if stop.load(Ordering::Relaxed) || tx.send(FRAME).await.is_err() {
                break;
            }
        }
        let _ = tx.send(0).await;
    });
    let (sent, v, result) = exchange(s, header, Some(header.answer()), rx, None, STALL).await;
    pacer.abort();
    end.finish(sent, &v, result);
    end
}

/// Runs the soak's client until told to stop: `streams` paced streams,
/// each reopened when it ends, and a probe every [`PROBE_EVERY`].
pub async fn client(o: ClientOpts) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let frames = o.stream_bytes.div_ceil(FRAME as u64).max(1);
    let gap = Duration::from_secs_f64(FRAME as f64 / o.rate.max(1) as f64);
    let mut seeds = Rng::new(o.seed);
    for slot in 0..o.streams {
        let (stop, connect, base) = (stop.clone(), o.connect, seeds.next_u64() & !PROBE_BIT);
        tasks.spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let h = Header {
                    seed: (base ^ seq.rotate_left(32)) & !PROBE_BIT,
                    slot,
                    seq,
                };
                let end = one(connect, h, frames, gap, stop.clone()).await;
                print_end(&end);
                if end.outcome != Outcome::Complete {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
    }
    let (pstop, connect, base) = (stop.clone(), o.connect, seeds.next_u64());
    tasks.spawn(async move {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pstop.load(Ordering::Relaxed) {
            tick.tick().await;
            seq += 1;
            let h = Header {
                seed: (base ^ seq) | PROBE_BIT,
                slot: u32::MAX,
                seq,
            };
            let never = Arc::new(AtomicBool::new(false));
            let started = now_ms();
            let end = match tokio::time::timeout(
                PROBE_TIMEOUT,
                one(connect, h, 1, Duration::from_millis(1), never),
            )
            .await
            {
                Ok(end) => end,
                Err(_) => {
                    let mut end = End::begun(Seen::Client, true, h.slot, seq);
                    end.opened_ms = started;
                    end.outcome = Outcome::Stalled;
                    end.error = format!("no answer in {PROBE_TIMEOUT:?}");
                    end
                }
            };
            print_end(&end);
        }
    });
    let deadline = tokio::time::Instant::now() + o.max;
    loop {
        let asked = o.stop_file.as_ref().is_some_and(|p| p.exists());
        if asked || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    // Every stream ends by itself now: its end frame goes out at the next
    // tick, and a stalled one gives up after STALL.
    let _ = tokio::time::timeout(STALL + PROBE_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Serves until killed: answers each connection's frames with its own and
/// prints each connection's [`End`].
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("soak server cannot listen on {listen}"))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut end = End::begun(Seen::Server, false, 0, 0);
            match read_header(&mut s, SERVER_IDLE).await {
                Err((outcome, error)) => {
                    let header = Err((outcome, format!("header: {error}")));
                    end.finish(0, &Verifier::new(0), header);
                    reset_on_close(&s);
                }
                Ok(h) => {
                    end.probe = h.seed & PROBE_BIT != 0;
                    end.slot = h.slot;
                    end.seq = h.seq;
                    let (tx, rx) = mpsc::channel(64);
                    let (sent, v, result) =
                        exchange(s, h.answer(), None, rx, Some(tx), SERVER_IDLE).await;
                    end.finish(sent, &v, result);
                }
            }
            print_end(&end);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_counts_every_byte_that_differs() {
        let mut p = Pattern::new(5);
        let mut data = vec![0u8; 1000];
        p.fill(&mut data);
        let mut v = Verifier::new(5);
        v.check(&data[..333]);
        data[500] ^= 1;
        data[900] ^= 0xff;
        v.check(&data[333..]);
        assert_eq!((v.bytes, v.corrupted), (1000, 2));
        let mut other = Verifier::new(6);
        other.check(&data[..64]);
        assert!(other.corrupted > 50);
    }

    #[test]
    fn headers_round_trip_and_bad_magic_is_refused() {
        let h = Header {
            seed: 9 | PROBE_BIT,
            slot: 3,
            seq: 77,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        let mut b = h.encode();
        b[0] = b'X';
        assert_eq!(Header::decode(&b), None);
        assert_ne!(h.answer().seed, h.seed);
    }

    async fn local_server() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        tokio::spawn(serve(addr));
        tokio::time::sleep(Duration::from_millis(50)).await;
        addr
    }

    /// A stream of up to 100 frames 5 ms apart to `addr`.
    async fn stream_to(addr: SocketAddr, slot: u32) -> End {
        let never = Arc::new(AtomicBool::new(false));
        one(addr, header(slot), 100, Duration::from_millis(5), never).await
    }

    fn header(slot: u32) -> Header {
        Header {
            seed: 42 + u64::from(slot),
            slot,
            seq: 1,
        }
    }

    #[tokio::test]
    async fn a_stream_through_the_server_completes_with_every_byte_checked() {
        let addr = local_server().await;
        let stop = Arc::new(AtomicBool::new(false));
        let end = one(addr, header(0), 20, Duration::from_millis(1), stop).await;
        assert_eq!(end.outcome, Outcome::Complete, "{end:?}");
        assert_eq!(
            (end.sent, end.received, end.corrupted),
            (20 * FRAME as u64, 20 * FRAME as u64, 0)
        );
    }

    /// A fake far end that answers the header and `frames` good frames,
    /// then `then` (flipping a byte first if `corrupt`).
    async fn fake(frames: usize, corrupt: bool, reset: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut hb = [0u8; HEADER_LEN];
            s.read_exact(&mut hb).await.unwrap();
            let h = Header::decode(&hb).unwrap().answer();
            s.write_all(&h.encode()).await.unwrap();
            let mut p = Pattern::new(h.seed);
            let mut buf = vec![0u8; FRAME];
            for i in 0..frames {
                p.fill(&mut buf);
                if corrupt && i == frames - 1 {
                    buf[10] ^= 0x40;
                }
                s.write_all(&(FRAME as u32).to_be_bytes()).await.unwrap();
                s.write_all(&buf).await.unwrap();
            }
            if reset {
                reset_on_close(&s);
                drop(s);
            } else {
                s.shutdown().await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_clean_eof_before_the_end_frame_is_a_truncation() {
        let addr = fake(2, false, false).await;
        let end = stream_to(addr, 1).await;
        assert_eq!(end.outcome, Outcome::Truncated, "{end:?}");
        assert_eq!(end.received, 2 * FRAME as u64);
    }

    #[tokio::test]
    async fn a_flipped_byte_is_corruption_and_a_rst_is_a_reset() {
        let addr = fake(3, true, false).await;
        let end = stream_to(addr, 2).await;
        assert_eq!(
            (end.outcome, end.corrupted),
            (Outcome::Corrupt, 1),
            "{end:?}"
        );
        let addr = fake(1, false, true).await;
        let end = stream_to(addr, 3).await;
        assert_eq!(end.outcome, Outcome::Reset, "{end:?}");
    }

    #[tokio::test]
    async fn nothing_listening_is_refused_not_a_break() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let end = one(
            addr,
            header(4),
            1,
            Duration::from_millis(1),
            Arc::new(AtomicBool::new(false)),
        )
        .await;
        assert_eq!(end.outcome, Outcome::Refused);
    }
}
