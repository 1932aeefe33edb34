//! A link emulator for the lab: one-way delay, jitter and random loss on
//! the "internet" links, since `tc netem` is not available on these kernels.
//!
//! Every link is emulated where packets *arrive*: in each internet-facing
//! namespace (the rendezvous, each side's outermost NAT), an iptables rule in
//! the raw PREROUTING hook (before conntrack) sends packets from each other
//! endpoint to its own NFQUEUE, and this program holds each packet for
//! `sender's uplink delay + receiver's downlink delay` before accepting it
//! (or drops it with the link's loss probability). A NAT therefore creates
//! its mapping the moment its host sends, as a home router does, and a
//! delayed SYN is looked up by the receiving NAT only when it "arrives".
//! Without jitter, order is kept; with jitter each packet gets its own delay
//! and may pass others, as on a real path. Only metadata is copied to
//! userspace (copy range 0): the verdict releases the kernel's own packet.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

/// One queue's impairments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ±jitter.
    pub jitter: Duration,
    /// Probability of dropping a packet, 0.0..=1.0.
    pub loss: f64,
}

impl Impairment {
    /// No impairment.
    pub const NONE: Impairment = Impairment {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
    };

    /// A fixed delay in milliseconds.
    pub fn delay_ms(ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(ms),
            ..Self::NONE
        }
    }

    /// Two impairments in series (an uplink, then a downlink).
    pub fn then(self, next: Impairment) -> Impairment {
        Impairment {
            delay: self.delay + next.delay,
            jitter: self.jitter + next.jitter,
            loss: 1.0 - (1.0 - self.loss) * (1.0 - next.loss),
        }
    }

    /// `QUEUE:DELAY_MS:JITTER_MS:LOSS_PCT`, the command-line form.
    pub fn spec(&self, queue: u16) -> String {
        format!(
            "{queue}:{}:{}:{}",
            self.delay.as_secs_f64() * 1e3,
            self.jitter.as_secs_f64() * 1e3,
            self.loss * 100.0
        )
    }

    /// Parses the command-line form.
    pub fn parse_spec(s: &str) -> Result<(u16, Impairment)> {
        let parts: Vec<&str> = s.split(':').collect();
        anyhow::ensure!(
            parts.len() == 4,
            "queue spec {s:?} is not QUEUE:DELAY_MS:JITTER_MS:LOSS_PCT"
        );
        let num = |i: usize| {
            parts[i]
                .parse::<f64>()
                .with_context(|| format!("bad number in {s:?}"))
        };
        let ms = |v: f64| Duration::from_secs_f64(v.max(0.0) / 1e3);
        Ok((
            parts[0].parse()?,
            Impairment {
                delay: ms(num(1)?),
                jitter: ms(num(2)?),
                loss: (num(3)? / 100.0).clamp(0.0, 1.0),
            },
        ))
    }
}

/// The iptables rule that sends packets from `source` arriving on `ifname`
/// to `queue`. `--queue-bypass` lets packets through untouched if the
/// emulator is not running, so a crashed emulator shows up as a wrong RTT,
/// never as a black hole.
pub fn rule_args(ifname: &str, source: &str, queue: u16) -> Vec<String> {
    [
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-i",
        ifname,
        "-s",
        source,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue.to_string(),
        "--queue-bypass",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The nftables table of a loss burst ([`loss_ruleset`]); deleting it
/// ends the burst.
pub const LOSS_TABLE: &str = "lab_loss";

/// A burst of loss on a link without touching its running emulator (which
/// has no control channel): an nftables table that drops `percent` of the
/// packets arriving on `ifname`, at priority -400, before conntrack and
/// before the emulator's raw-table queue, exactly where the link's own
/// loss would drop them.
pub fn loss_ruleset(ifname: &str, percent: u32) -> String {
    format!(
        "table inet {LOSS_TABLE} {{\n  chain pre {{ type filter hook prerouting priority -400; policy accept; \
         iifname \"{ifname}\" numgen random mod 100 < {percent} drop; }}\n}}\n"
    )
}

/// xorshift64*: enough randomness for loss and jitter, no dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// When a packet may go, given its arrival and the previous release in its
/// direction. Sans-IO so the ordering rule is testable.
pub fn release_at(now: Instant, imp: &Impairment, last: Instant, unit: f64) -> Instant {
    if imp.jitter.is_zero() {
        return (now + imp.delay).max(last);
    }
    let spread = imp.jitter.as_secs_f64() * (2.0 * unit - 1.0);
    let d = (imp.delay.as_secs_f64() + spread).max(0.0);
    now + Duration::from_secs_f64(d)
}

/// Runs until `stop` is set, applying each queue's impairment.
pub fn run(queues: &[(u16, Impairment)], stop: Arc<AtomicBool>) -> Result<()> {
    let mut q =
        nfq::Queue::open().context("cannot open NFQUEUE (is nfnetlink_queue available?)")?;
    let mut by_queue: HashMap<u16, (Impairment, Instant)> = HashMap::new();
    for (num, imp) in queues {
        q.bind(*num)
            .with_context(|| format!("cannot bind NFQUEUE {num}"))?;
        q.set_copy_range(*num, 0)?;
        // Room for a long fat path: 150 ms at 1 Gbit/s is ~12,500 packets.
        q.set_queue_max_len(*num, 65_536)?;
        by_queue.insert(*num, (*imp, Instant::now()));
    }
    q.set_nonblocking(true);
    let mut rng = Rng::seeded();
    let mut held: BinaryHeap<Reverse<(Instant, u64, usize)>> = BinaryHeap::new();
    let mut parked: Vec<Option<nfq::Message>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some(Reverse((due, _, slot))) = held.peek().copied() {
            if due > now {
                break;
            }
            held.pop();
            if let Some(mut msg) = parked[slot].take() {
                msg.set_verdict(nfq::Verdict::Accept);
                q.verdict(msg)?;
            }
            free.push(slot);
        }
        match q.recv() {
            Ok(mut msg) => {
                // The packet's delay counts from now, when it is in hand,
                // not from the loop's `now` above: if this process lost
                // the CPU between the two (seen in CI: 4 ms), a packet
                // that arrived meanwhile would go out that much early,
                // and a path would look shorter than asked.
                let now = Instant::now();
                let Some((imp, last)) = by_queue.get_mut(&msg.get_queue_num()) else {
                    msg.set_verdict(nfq::Verdict::Accept);
                    q.verdict(msg)?;
                    continue;
                };
                if imp.loss > 0.0 && rng.unit() < imp.loss {
                    msg.set_verdict(nfq::Verdict::Drop);
                    q.verdict(msg)?;
                    continue;
                }
                let due = release_at(now, imp, *last, rng.unit());
                *last = due;
                if due <= now {
                    msg.set_verdict(nfq::Verdict::Accept);
                    q.verdict(msg)?;
                    continue;
                }
                let slot = match free.pop() {
                    Some(s) => {
                        parked[s] = Some(msg);
                        s
                    }
                    None => {
                        parked.push(Some(msg));
                        parked.len() - 1
                    }
                };
                seq += 1;
                held.push(Reverse((due, seq, slot)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let next = held
                    .peek()
                    .map_or(Duration::from_micros(200), |Reverse((d, _, _))| {
                        d.saturating_duration_since(Instant::now())
                    });
                std::thread::sleep(next.min(Duration::from_micros(200)));
            }
            Err(e) => return Err(e).context("NFQUEUE receive failed"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_delay_keeps_order() {
        let t0 = Instant::now();
        let imp = Impairment::delay_ms(10);
        let a = release_at(t0, &imp, t0, 0.5);
        assert_eq!(a, t0 + Duration::from_millis(10));
        // A later packet never overtakes an earlier one.
        let b = release_at(t0, &imp, a + Duration::from_millis(1), 0.5);
        assert_eq!(b, a + Duration::from_millis(1));
    }

    #[test]
    fn specs_round_trip_and_links_add_up() {
        let up = Impairment {
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss: 0.02,
        };
        let path = up.then(Impairment::delay_ms(70));
        assert_eq!(path.delay, Duration::from_millis(75));
        assert!((path.loss - 0.02).abs() < 1e-9);
        let (q, back) = Impairment::parse_spec(&path.spec(12)).unwrap();
        assert_eq!(q, 12);
        assert_eq!(back.delay, path.delay);
        assert!(Impairment::parse_spec("1:2").is_err());
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let t0 = Instant::now();
        let imp = Impairment {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            loss: 0.0,
        };
        assert_eq!(
            release_at(t0, &imp, t0, 0.0),
            t0 + Duration::from_millis(15)
        );
        assert_eq!(
            release_at(t0, &imp, t0, 1.0),
            t0 + Duration::from_millis(25)
        );
        let mut rng = Rng::seeded();
        let mean = (0..10_000).map(|_| rng.unit()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
