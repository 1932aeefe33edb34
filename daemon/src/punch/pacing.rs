//! Keeps the path's queue short under a bulk transfer: a delay-based cap
//! on a punched TCP tunnel socket's pacing rate.
//!
//! Why: every stream of a tunnel shares its one TCP connection, so a 64-byte
//! request on an interactive stream waits behind whatever the bulk stream
//! has queued *in the network*. With the tunnel's buffers sized for long
//! paths ([`super::buffers`]), the kernel's BBR (v1) keeps up to twice its
//! bandwidth estimate times the RTT in flight, and where the bottleneck has
//! a deep buffer that is up to one whole RTT of queue: measured in the lab
//! at 200 ms RTT, a round trip under a bulk download took +202 ms (issue
//! 18). The unsent data inside the host is already bounded
//! (`TCP_NOTSENT_LOWAT`); this bounds what waits in the path.
//!
//! How: every round trip (25–200 ms) the tunnel reads its socket's
//! `TCP_INFO`. When the smoothed RTT stands more than [`HIGH`] above the
//! least RTT of the last [`BASE_WINDOW`], the path is queueing what we
//! send: the pacing rate is capped (`SO_MAX_PACING_RATE`) just under the
//! rate the path delivered, so the queue drains. While the RTT stays
//! within [`LOW`] of the base, the cap grows by 1/16 per round trip, and
//! once it is far above what is delivered it is lifted. The base is our
//! own 10 s minimum, not the kernel's 5-minute `tcpi_min_rtt`: after a
//! route change to a longer path, or against another flow that keeps the
//! bottleneck's buffer full, the standing delay becomes the new base
//! within 10 s instead of throttling the tunnel for minutes.
//!
//! The decisions are [`Pacer`] (samples in, cap changes out, no sockets);
//! [`alongside`] is the loop that runs it next to a tunnel's driver.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use tokio::time::Instant;

use super::sockopt;

/// Queueing delay above the base that triggers a cap.
pub(crate) const HIGH: Duration = Duration::from_millis(10);
/// Queueing delay below which a cap may grow.
pub(crate) const LOW: Duration = Duration::from_millis(4);
/// How long the least RTT seen stays the base.
pub(crate) const BASE_WINDOW: Duration = Duration::from_secs(10);
/// A cap is this share of the delivered rate: the queue drains at the
/// rest.
const CAP_SHARE: (u64, u64) = (7, 8);
/// A cap never goes below this (bytes per second; 1 Mbit/s).
const FLOOR: u64 = 125_000;
/// Samples come this often at least and at most (else once per base RTT).
const INTERVAL: (Duration, Duration) = (Duration::from_millis(25), Duration::from_millis(200));
/// A cap this many times the delivered rate no longer binds: lifted.
const LIFT_ABOVE: u64 = 4;

/// What one look at the socket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// The kernel's smoothed RTT.
    pub(crate) rtt: Duration,
    /// What the path delivered lately, bytes per second.
    pub(crate) delivery_rate: u64,
    /// The sender had too little to send to fill the path: the delivered
    /// rate says nothing about the bottleneck.
    pub(crate) app_limited: bool,
}

/// What to do with the socket's pacing cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Cap the pacing rate at this many bytes per second.
    Cap(u64),
    /// No cap (the congestion controller's own pacing).
    Lift,
}

/// The delay-based cap's state for one socket.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    /// Candidates for the base RTT: increasing RTTs, each with when it was
    /// seen (a windowed minimum; at most one entry per sample in the
    /// window, so bounded by [`BASE_WINDOW`] ÷ the shortest interval).
    base: VecDeque<(Instant, Duration)>,
    cap: Option<u64>,
}

impl Pacer {
    /// The least RTT in the window ending `now`, after adding `rtt`.
    fn base(&mut self, now: Instant, rtt: Duration) -> Duration {
        while self.base.back().is_some_and(|&(_, r)| r >= rtt) {
            self.base.pop_back();
        }
        self.base.push_back((now, rtt));
        while self
            .base
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > BASE_WINDOW)
        {
            self.base.pop_front();
        }
        self.base.front().map_or(rtt, |&(_, r)| r)
    }

    /// Takes one sample; says how the cap changes, if it does.
    pub(crate) fn on_sample(&mut self, now: Instant, s: Sample) -> Option<Change> {
        if s.rtt.is_zero() {
            return None; // no RTT measured yet
        }
        let base = self.base(now, s.rtt);
        let queue = s.rtt.saturating_sub(base);
        if queue > HIGH {
            // Only what we were sending fast enough to queue says where the
            // bottleneck is; an app-limited rate would cap us far too low.
            if s.app_limited || s.delivery_rate == 0 {
                return None;
            }
            let want = (s.delivery_rate / CAP_SHARE.1 * CAP_SHARE.0).max(FLOOR);
            if self.cap.is_none_or(|c| want < c) {
                self.cap = Some(want);
                return Some(Change::Cap(want));
            }
            return None;
        }
        let cap = self.cap?;
        if queue >= LOW {
            return None;
        }
        if cap / LIFT_ABOVE > s.delivery_rate {
            self.cap = None;
            return Some(Change::Lift);
        }
        let grown = cap.saturating_add(cap / 16);
        self.cap = Some(grown);
        Some(Change::Cap(grown))
    }

    /// How long until the next sample: about one base round trip.
    pub(crate) fn interval(&self) -> Duration {
        self.base
            .front()
            .map_or(INTERVAL.1, |&(_, r)| r)
            .clamp(INTERVAL.0, INTERVAL.1)
    }

    /// The cap in force, bytes per second.
    #[cfg(test)]
    fn cap(&self) -> Option<u64> {
        self.cap
    }
}

/// Reads a socket's [`Sample`] from `TCP_INFO`.
fn sample(fd: &OwnedFd) -> Option<Sample> {
    let mut buf = [0u8; std::mem::size_of::<libc::tcp_info>()];
    let n = sockopt::get_into(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf).ok()?;
    parse(&buf[..n])
}

/// The byte of `struct tcp_info` whose lowest bit is
/// `tcpi_delivery_rate_app_limited` (right after the two window scales;
/// `libc` leaves it unnamed).
const APP_LIMITED_BYTE: usize = 7;

/// The fields a [`Sample`] needs, from `TCP_INFO`'s bytes (kernel ABI
/// layout); `None` if the kernel is too old to report a delivery rate.
fn parse(info: &[u8]) -> Option<Sample> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(info.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_ne_bytes(info.get(at..at + 8)?.try_into().ok()?))
    };
    let rtt_us = u32_at(std::mem::offset_of!(libc::tcp_info, tcpi_rtt))?;
    let delivery_rate = u64_at(std::mem::offset_of!(libc::tcp_info, tcpi_delivery_rate))?;
    let app_limited = info.get(APP_LIMITED_BYTE)? & 1 == 1;
    Some(Sample {
        rtt: Duration::from_micros(u64::from(rtt_us)),
        delivery_rate,
        app_limited,
    })
}

fn apply(fd: &OwnedFd, change: Change) -> std::io::Result<()> {
    let rate = match change {
        Change::Cap(r) => r,
        Change::Lift => u64::MAX, // the kernel's "unlimited"
    };
    sockopt::set(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_MAX_PACING_RATE,
        &rate,
    )
}

/// Runs `driver` (a TCP tunnel's) with the pacing cap kept on `fd`, a
/// duplicate of its socket's descriptor; ends when the driver does. If the
/// socket cannot be read or capped (an old kernel), the driver just runs.
pub(crate) async fn alongside(fd: OwnedFd, driver: impl Future<Output = ()>) {
    let mut pacer = Pacer::default();
    tokio::pin!(driver);
    loop {
        tokio::select! {
            () = &mut driver => return,
            () = tokio::time::sleep(pacer.interval()) => {}
        }
        let Some(s) = sample(&fd) else {
            tracing::debug!(
                "no TCP_INFO delivery rate on this kernel; the tunnel's pacing stays uncapped"
            );
            return driver.await;
        };
        if let Some(change) = pacer.on_sample(Instant::now(), s) {
            tracing::trace!(
                ?change,
                rtt_ms = s.rtt.as_secs_f64() * 1e3,
                delivery_rate = s.delivery_rate,
                "pacing cap"
            );
            if let Err(e) = apply(&fd, change) {
                tracing::debug!(error = %e, "cannot cap the tunnel's pacing rate; it stays uncapped");
                return driver.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn s(rtt_ms: u64, rate: u64) -> Sample {
        Sample {
            rtt: MS * u32::try_from(rtt_ms).unwrap(),
            delivery_rate: rate,
            app_limited: false,
        }
    }

    #[test]
    fn a_standing_queue_caps_just_under_the_delivered_rate_and_the_cap_only_falls_while_it_stands()
    {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.on_sample(t0, s(200, 40_000_000)), None, "the base itself");
        assert_eq!(
            p.on_sample(t0 + MS * 200, s(205, 40_000_000)),
            None,
            "under HIGH"
        );
        // 50 ms of queue: capped at 7/8 of what was delivered.
        assert_eq!(
            p.on_sample(t0 + MS * 400, s(250, 40_000_000)),
            Some(Change::Cap(35_000_000))
        );
        // Still queued (the drain takes round trips): never raised...
        assert_eq!(p.on_sample(t0 + MS * 600, s(240, 42_000_000)), None);
        // ...lowered if the path now delivers less.
        assert_eq!(
            p.on_sample(t0 + MS * 800, s(230, 32_000_000)),
            Some(Change::Cap(28_000_000))
        );
        // Between LOW and HIGH: held.
        assert_eq!(p.on_sample(t0 + MS * 1000, s(206, 28_000_000)), None);
        // Drained: grows by 1/16 per sample.
        assert_eq!(
            p.on_sample(t0 + MS * 1200, s(201, 28_000_000)),
            Some(Change::Cap(29_750_000))
        );
    }

    #[test]
    fn an_app_limited_sender_is_never_capped_by_its_own_small_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        p.on_sample(t0, s(40, 1_000_000));
        let mut busy = s(90, 1_000);
        busy.app_limited = true;
        assert_eq!(p.on_sample(t0 + MS * 40, busy), None);
        assert_eq!(p.cap(), None);
        // And a tiny delivered rate caps no lower than the floor.
        assert_eq!(
            p.on_sample(t0 + MS * 80, s(90, 1_000)),
            Some(Change::Cap(FLOOR))
        );
    }

    #[test]
    fn a_cap_far_above_what_is_delivered_is_lifted() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        p.on_sample(t0, s(20, 10_000_000));
        assert_eq!(
            p.on_sample(t0 + MS * 25, s(40, 8_000_000)),
            Some(Change::Cap(7_000_000))
        );
        // The bulk transfer ended: little is delivered, no queue.
        assert_eq!(
            p.on_sample(t0 + MS * 50, s(20, 1_000_000)),
            Some(Change::Lift)
        );
        assert_eq!(p.cap(), None);
        assert_eq!(p.on_sample(t0 + MS * 75, s(20, 1_000_000)), None);
    }

    #[test]
    fn a_longer_path_becomes_the_base_within_the_window_instead_of_throttling_for_good() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        p.on_sample(t0, s(20, 10_000_000));
        // The route changed: 120 ms from now on. Capped at first...
        assert!(matches!(
            p.on_sample(t0 + MS * 25, s(120, 10_000_000)),
            Some(Change::Cap(_))
        ));
        let mut at = t0 + MS * 25;
        let mut last = None;
        while at < t0 + BASE_WINDOW + Duration::from_secs(5) {
            at += MS * 120;
            last = p.on_sample(at, s(120, 10_000_000)).or(last);
        }
        // ...but once the old minimum left the window the queue reads zero
        // and the cap grew until it was lifted.
        assert_eq!(p.interval(), MS * 120);
        assert_eq!(last, Some(Change::Lift), "cap {:?}", p.cap());
    }

    #[test]
    fn the_base_window_stays_bounded() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        // Rising RTTs are each a future minimum: the deque keeps them, but
        // only for the window.
        for i in 0..10_000u32 {
            p.on_sample(t0 + INTERVAL.0 * i, s(20 + u64::from(i % 400), 1_000_000));
        }
        let most = usize::try_from(BASE_WINDOW.as_millis() / INTERVAL.0.as_millis()).unwrap() + 1;
        assert!(p.base.len() <= most, "{} entries", p.base.len());
    }

    #[test]
    fn tcp_info_is_read_at_the_kernels_offsets() {
        // The unnamed byte follows the window scales.
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_snd_rcv_wscale), 6);
        // From a live connection: an RTT, and a delivery rate field.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut a, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut a, &[0u8; 100_000]).unwrap();
        let mut buf = vec![0u8; 100_000];
        std::io::Read::read_exact(&mut &c, &mut buf).unwrap();
        let fd = OwnedFd::from(a);
        let got = sample(&fd).expect("TCP_INFO with a delivery rate");
        assert!(got.rtt > Duration::ZERO, "{got:?}");
        assert!(got.delivery_rate > 0, "{got:?}");
        // A cap is accepted and reported back; lifting it too.
        apply(&fd, Change::Cap(1_000_000)).unwrap();
        let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
        let n = sockopt::get_into(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
            .unwrap();
        let at = std::mem::offset_of!(libc::tcp_info, tcpi_max_pacing_rate);
        let max = u64::from_ne_bytes(info[at..at + 8].try_into().unwrap());
        assert!(n > at && max == 1_000_000, "max pacing rate {max}");
        apply(&fd, Change::Lift).unwrap();
        sockopt::get_into(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, &mut info).unwrap();
        assert_eq!(
            u64::from_ne_bytes(info[at..at + 8].try_into().unwrap()),
            u64::MAX
        );
    }
}
