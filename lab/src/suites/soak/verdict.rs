//! What a soak's record means: which broken stream the fault that hit it
//! explains, which truncation is the daemon's fault, how long each fault
//! took to recover from, whether the daemons grew, and the verdict. Pure:
//! the runner collects the record, this judges it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::schedule::{Breaks, Fault, Side};
use super::stream::{End, Outcome, Seen};
use crate::harness::stats::percentile;

/// A fault as it happened, on the clock of [`super::stream::now_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    /// What it was.
    pub fault: Fault,
    /// When it began.
    pub start_ms: u64,
    /// When it was over (restarted, burst ended, timeouts restored).
    pub end_ms: u64,
    /// Whether alice's tunnel was relayed when it began (a punch after a
    /// peer restart can lose and fall back to the relay until the next
    /// upgrade): the rendezvous is then in the data path, and killing it
    /// must end the tunnel's streams.
    pub relayed: bool,
}

impl Injected {
    /// Whether it may end streams open while it acts, on the path it hit.
    pub fn breaks(&self) -> Breaks {
        match self.fault {
            Fault::KillRendezvous if self.relayed => Breaks::Must,
            f => f.breaks(),
        }
    }
}

/// A daemon's footprint, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// One daemon's footprint at the start and at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Growth {
    /// `alice` or `bob`.
    pub who: String,
    /// After the warm-up, streams open.
    pub start: Footprint,
    /// Before the wind-down, streams open.
    pub end: Footprint,
}

/// How much a daemon may grow over a soak: RSS to 1.5 × plus this ...
pub const RSS_SLACK_KIB: u64 = 8 * 1024;
/// ... and this many more open fds (probes and reopened streams in flight).
pub const FD_SLACK: u64 = 16;
/// A truncation seen within this long of a SIGKILL of the process at the
/// other end of that very socket is the kernel's FIN for the dead
/// process's socket (it sends one when nothing was left unread): no daemon
/// can turn that into a reset, so it is counted apart.
pub const KILL_CUT: Duration = Duration::from_secs(2);

impl Growth {
    /// Whether it stayed flat.
    pub fn flat(&self) -> bool {
        self.end.rss_kib <= self.start.rss_kib * 3 / 2 + RSS_SLACK_KIB
            && self.end.fds <= self.start.fds + FD_SLACK
    }
}

/// The fault that explains a client connection's failure: the latest one
/// that may break streams and whose window (start to end + its recovery
/// bound) holds the moment it failed.
pub fn explained_by(end: &End, faults: &[Injected]) -> Option<usize> {
    faults.iter().rposition(|f| {
        let bound = f.fault.recovery_bound().as_millis() as u64;
        f.breaks() != Breaks::Never && f.start_ms <= end.at_ms && end.at_ms <= f.end_ms + bound
    })
}

/// Whether a truncation is the kernel's FIN for a SIGKILLed process's
/// socket ([`KILL_CUT`]): the client's socket ends at alice's forward, the
/// server's at bob's expose.
pub fn cut_by_kill(end: &End, faults: &[Injected]) -> bool {
    let side = match end.seen {
        Seen::Client => Side::A,
        Seen::Server => Side::B,
    };
    end.outcome == Outcome::Truncated
        && faults.iter().any(|f| {
            f.fault == Fault::KillPeer(side)
                && f.start_ms <= end.at_ms
                && end.at_ms <= f.start_ms + KILL_CUT.as_millis() as u64
        })
}

/// How long after `f` began the first probe started since then came
/// through, if one did within the fault's recovery bound.
pub fn recovered_after(f: &Injected, ends: &[End]) -> Option<Duration> {
    let bound = f.fault.recovery_bound();
    ends.iter()
        .filter(|e| {
            e.seen == Seen::Client
                && e.probe
                && e.outcome == Outcome::Complete
                && e.opened_ms >= f.start_ms
        })
        .map(|e| Duration::from_millis(e.at_ms.saturating_sub(f.start_ms)))
        .min()
        .filter(|d| *d <= bound)
}

/// Recovery times of one fault kind, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recovery {
    /// Faults of this kind.
    pub count: usize,
    /// Median.
    pub p50_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Faults that did not recover within their bound.
    pub never: usize,
    /// That bound.
    pub bound_s: f64,
}

/// One fault in the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultLine {
    /// What it was.
    pub fault: String,
    /// Seconds into the soak.
    pub at_s: f64,
    /// Seconds to working again (`None`: not within its bound).
    pub recovered_s: Option<f64>,
    /// Client connections it explains the failure of.
    pub breaks: u64,
}

/// The soak's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The seed of the fault plan and the streams' patterns.
    pub seed: u64,
    /// Length of the soak.
    pub seconds: f64,
    /// Verified bytes alice → bob (the server checked them).
    pub bytes_a_to_b: u64,
    /// Verified bytes bob → alice (the client checked them).
    pub bytes_b_to_a: u64,
    /// Long streams opened.
    pub streams_opened: u64,
    /// Of those, how many did not complete.
    pub streams_broken: u64,
    /// Probes run, and how many failed.
    pub probes: u64,
    /// Probes that did not complete (or could not connect).
    pub probe_failures: u64,
    /// Broken streams and failed probes per fault kind that explains
    /// them (a stream's refused connect while alice is down is not a
    /// break, only needs explaining).
    pub breaks_by_kind: BTreeMap<String, u64>,
    /// Failures no fault explains.
    pub unexplained: u64,
    /// The first [`LISTED`] of them.
    pub unexplained_list: Vec<String>,
    /// Bytes that differed from their pattern (either side).
    pub corrupted_bytes: u64,
    /// Clean EOFs before the end frame that no SIGKILL explains.
    pub truncated: u64,
    /// The first [`LISTED`] of them.
    pub truncated_list: Vec<String>,
    /// Truncations that are a killed process's own FIN ([`KILL_CUT`]).
    pub cut_by_kill: u64,
    /// Every fault, in order.
    pub faults: Vec<FaultLine>,
    /// Recovery per fault kind.
    pub recovery: BTreeMap<String, Recovery>,
    /// Both daemons' RSS and fds.
    pub growth: Vec<Growth>,
    /// Why the soak failed; empty when it passed.
    pub failures: Vec<String>,
}

fn describe(e: &End, t0: u64) -> String {
    format!(
        "{:?} {} slot {} #{} at {:.1}s: {:?} after {} B sent / {} B received{}",
        e.seen,
        if e.probe { "probe" } else { "stream" },
        e.slot,
        e.seq,
        e.at_ms.saturating_sub(t0) as f64 / 1e3,
        e.outcome,
        e.sent,
        e.received,
        if e.error.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.error)
        }
    )
}

/// Lists are cut to this many entries in the summary.
pub const LISTED: usize = 20;

/// Judges a soak: `t0_ms` its start, `ends` every connection end from
/// both sides, `faults` what was injected, `growth` the daemons'
/// footprints.
pub fn judge(
    seed: u64,
    t0_ms: u64,
    t1_ms: u64,
    ends: &[End],
    faults: &[Injected],
    growth: Vec<Growth>,
) -> Summary {
    let client: Vec<&End> = ends.iter().filter(|e| e.seen == Seen::Client).collect();
    let mut breaks = vec![0u64; faults.len()];
    let mut unexplained = Vec::new();
    let (mut opened, mut broken, mut probes, mut probe_failures) = (0, 0, 0, 0);
    for e in &client {
        if e.probe {
            probes += 1;
        } else if e.outcome != Outcome::Refused {
            opened += 1;
        }
        if e.outcome == Outcome::Complete {
            continue;
        }
        let is_break = e.probe || e.outcome != Outcome::Refused;
        if e.probe {
            probe_failures += 1;
        } else if is_break {
            broken += 1;
        }
        match explained_by(e, faults) {
            Some(i) => breaks[i] += u64::from(is_break),
            None => unexplained.push(describe(e, t0_ms)),
        }
    }
    let mut truncated = Vec::new();
    let mut cut = 0;
    for e in ends.iter().filter(|e| e.outcome == Outcome::Truncated) {
        if cut_by_kill(e, faults) {
            cut += 1;
        } else {
            truncated.push(describe(e, t0_ms));
        }
    }
    let corrupted_bytes = ends.iter().map(|e| e.corrupted).sum();
    let received = |seen| {
        ends.iter()
            .filter(|e| e.seen == seen)
            .map(|e| e.received)
            .sum()
    };

    let mut by_kind: BTreeMap<&str, Vec<Option<Duration>>> = BTreeMap::new();
    let mut lines = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        let r = recovered_after(f, ends);
        by_kind.entry(f.fault.kind()).or_default().push(r);
        lines.push(FaultLine {
            fault: if f.relayed {
                format!("{} (relayed)", f.fault)
            } else {
                f.fault.to_string()
            },
            at_s: f.start_ms.saturating_sub(t0_ms) as f64 / 1e3,
            recovered_s: r.map(|d| d.as_secs_f64()),
            breaks: breaks[i],
        });
    }
    let mut breaks_by_kind = BTreeMap::new();
    for (f, n) in faults.iter().zip(&breaks) {
        *breaks_by_kind.entry(f.fault.kind().to_owned()).or_insert(0) += n;
    }
    let recovery: BTreeMap<String, Recovery> = by_kind
        .into_iter()
        .map(|(kind, rs)| {
            let mut s: Vec<f64> = rs.iter().flatten().map(Duration::as_secs_f64).collect();
            s.sort_by(f64::total_cmp);
            let bound = faults
                .iter()
                .find(|f| f.fault.kind() == kind)
                .map_or(0.0, |f| f.fault.recovery_bound().as_secs_f64());
            let r = Recovery {
                count: rs.len(),
                p50_s: percentile(&s, 0.5),
                p99_s: percentile(&s, 0.99),
                max_s: s.last().copied().unwrap_or(0.0),
                never: rs.iter().filter(|r| r.is_none()).count(),
                bound_s: bound,
            };
            (kind.to_owned(), r)
        })
        .collect();

    let mut failures = Vec::new();
    if corrupted_bytes > 0 {
        failures.push(format!("{corrupted_bytes} bytes corrupted"));
    }
    if !truncated.is_empty() {
        failures.push(format!("{} streams silently truncated", truncated.len()));
    }
    if !unexplained.is_empty() {
        failures.push(format!("{} failures no fault explains", unexplained.len()));
    }
    for (kind, r) in &recovery {
        if r.never > 0 {
            failures.push(format!(
                "{} {kind} faults not recovered within {}s",
                r.never, r.bound_s
            ));
        }
    }
    for g in &growth {
        if !g.flat() {
            failures.push(format!(
                "{} grew: RSS {} → {} KiB, fds {} → {}",
                g.who, g.start.rss_kib, g.end.rss_kib, g.start.fds, g.end.fds
            ));
        }
    }
    if opened == 0 {
        failures.push("no stream was ever opened".to_owned());
    }
    let (n_unexplained, n_truncated) = (unexplained.len() as u64, truncated.len() as u64);
    unexplained.truncate(LISTED);
    truncated.truncate(LISTED);
    Summary {
        seed,
        seconds: t1_ms.saturating_sub(t0_ms) as f64 / 1e3,
        bytes_a_to_b: received(Seen::Server),
        bytes_b_to_a: received(Seen::Client),
        streams_opened: opened,
        streams_broken: broken,
        probes,
        probe_failures,
        breaks_by_kind,
        unexplained: n_unexplained,
        unexplained_list: unexplained,
        corrupted_bytes,
        truncated: n_truncated,
        truncated_list: truncated,
        cut_by_kill: cut,
        faults: lines,
        recovery,
        growth,
        failures,
    }
}

impl Summary {
    /// Whether the soak passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "soak: {:.0}s, seed {}, {} faults",
            self.seconds,
            self.seed,
            self.faults.len()
        )?;
        writeln!(
            f,
            "  bytes: alice→bob {:.1} MiB, bob→alice {:.1} MiB (every byte checked)",
            mib(self.bytes_a_to_b),
            mib(self.bytes_b_to_a)
        )?;
        writeln!(
            f,
            "  streams: {} opened, {} broken; probes: {} run, {} failed",
            self.streams_opened, self.streams_broken, self.probes, self.probe_failures
        )?;
        let by: Vec<String> = self
            .breaks_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "  failures explained by: {}", by.join(", "))?;
        writeln!(f, "  unexplained: {}", self.unexplained)?;
        for u in &self.unexplained_list {
            writeln!(f, "    {u}")?;
        }
        writeln!(f, "  bytes corrupted: {}", self.corrupted_bytes)?;
        writeln!(
            f,
            "  streams silently truncated: {} (plus {} cut by a SIGKILL's own FIN)",
            self.truncated, self.cut_by_kill
        )?;
        for t in &self.truncated_list {
            writeln!(f, "    {t}")?;
        }
        writeln!(f, "  recovery (fault → a probe through again):")?;
        for (kind, r) in &self.recovery {
            writeln!(
                f,
                "    {kind:16} n={:<3} p50 {:.2}s p99 {:.2}s max {:.2}s, not within {}s: {}",
                r.count, r.p50_s, r.p99_s, r.max_s, r.bound_s, r.never
            )?;
        }
        writeln!(f, "  faults:")?;
        for l in &self.faults {
            let r = l
                .recovered_s
                .map_or("never".to_owned(), |s| format!("{s:.2}s"));
            writeln!(
                f,
                "    {:7.1}s {:24} recovered {r:>7}, {} failures",
                l.at_s, l.fault, l.breaks
            )?;
        }
        for g in &self.growth {
            writeln!(
                f,
                "  {}: RSS {} → {} KiB, fds {} → {} ({})",
                g.who,
                g.start.rss_kib,
                g.end.rss_kib,
                g.start.fds,
                g.end.fds,
                if g.flat() { "flat" } else { "GREW" }
            )?;
        }
        if self.passed() {
            write!(f, "  PASS")
        } else {
            write!(f, "  FAIL: {}", self.failures.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(seen: Seen, probe: bool, at_ms: u64, outcome: Outcome) -> End {
        End {
            seen,
            probe,
            slot: 0,
            seq: 1,
            opened_ms: at_ms.saturating_sub(100),
            at_ms,
            sent: 10,
            received: 10,
            corrupted: 0,
            outcome,
            error: String::new(),
        }
    }

    fn at(fault: Fault, start_ms: u64, end_ms: u64) -> Injected {
        Injected {
            fault,
            start_ms,
            end_ms,
            relayed: false,
        }
    }

    #[test]
    fn a_break_is_explained_only_by_a_fault_that_may_break_it_in_its_window() {
        let faults = [
            at(Fault::Flush(Side::A), 10_000, 10_000),
            at(Fault::KillRendezvous, 60_000, 61_000),
            at(Fault::KillPeer(Side::B), 100_000, 101_000),
        ];
        let reset = |t| end(Seen::Client, false, t, Outcome::Reset);
        assert_eq!(explained_by(&reset(10_500), &faults), Some(0));
        // Within the flush's 30 s bound, but not before it.
        assert_eq!(explained_by(&reset(39_000), &faults), Some(0));
        assert_eq!(explained_by(&reset(9_000), &faults), None);
        // The rendezvous must not break a direct tunnel.
        assert_eq!(explained_by(&reset(60_500), &faults), None);
        assert_eq!(explained_by(&reset(100_200), &faults), Some(2));
        assert_eq!(explained_by(&reset(117_000), &faults), None);
    }

    #[test]
    fn a_rendezvous_kill_explains_breaks_only_on_a_relayed_tunnel() {
        let relayed = Injected {
            relayed: true,
            ..at(Fault::KillRendezvous, 60_000, 61_000)
        };
        let reset = end(Seen::Client, false, 60_500, Outcome::Reset);
        assert_eq!(
            explained_by(&reset, &[at(Fault::KillRendezvous, 60_000, 61_000)]),
            None
        );
        assert_eq!(explained_by(&reset, &[relayed]), Some(0));
        // A relayed flush is still only a "may".
        let flush = Injected {
            relayed: true,
            ..at(Fault::Flush(Side::A), 60_000, 60_000)
        };
        assert_eq!(flush.breaks(), Breaks::May);
    }

    #[test]
    fn only_the_killed_process_s_own_socket_may_end_in_a_fin() {
        let faults = [at(Fault::KillPeer(Side::B), 5_000, 6_000)];
        // bob's socket to the server: the kernel's FIN for dead bob.
        assert!(cut_by_kill(
            &end(Seen::Server, false, 5_010, Outcome::Truncated),
            &faults
        ));
        // alice's forward closing cleanly because bob died: the defect.
        assert!(!cut_by_kill(
            &end(Seen::Client, false, 5_010, Outcome::Truncated),
            &faults
        ));
        assert!(!cut_by_kill(
            &end(Seen::Server, false, 9_000, Outcome::Truncated),
            &faults
        ));
        assert!(!cut_by_kill(
            &end(Seen::Server, false, 5_010, Outcome::Reset),
            &faults
        ));
    }

    #[test]
    fn recovery_is_the_first_probe_started_after_the_fault_that_got_through() {
        let f = at(Fault::Flush(Side::B), 1_000, 1_000);
        let p = |opened, at, outcome| {
            let mut e = end(Seen::Client, true, at, outcome);
            e.opened_ms = opened;
            e
        };
        let ends = vec![
            p(900, 1_100, Outcome::Complete), // started before the fault
            p(1_200, 4_000, Outcome::Reset),
            p(2_000, 3_500, Outcome::Complete),
            p(2_500, 2_800, Outcome::Complete),
        ];
        assert_eq!(
            recovered_after(&f, &ends),
            Some(Duration::from_millis(1_800))
        );
        let late = vec![p(1_500, 40_000, Outcome::Complete)];
        assert_eq!(recovered_after(&f, &late), None);
    }

    #[test]
    fn the_verdict_fails_on_truncation_corruption_unexplained_breaks_and_growth() {
        let faults = [at(Fault::KillPeer(Side::B), 10_000, 11_000)];
        let flat = Growth {
            who: "alice".into(),
            start: Footprint {
                rss_kib: 20_000,
                fds: 30,
            },
            end: Footprint {
                rss_kib: 25_000,
                fds: 33,
            },
        };
        let mut probe = end(Seen::Client, true, 12_000, Outcome::Complete);
        probe.opened_ms = 11_500;
        let good = vec![
            end(Seen::Client, false, 5_000, Outcome::Complete),
            end(Seen::Server, false, 5_000, Outcome::Complete),
            end(Seen::Client, false, 10_100, Outcome::Reset),
            end(Seen::Server, false, 10_050, Outcome::Truncated),
            probe,
        ];
        let s = judge(1, 0, 20_000, &good, &faults, vec![flat.clone()]);
        assert!(s.passed(), "{s}");
        assert_eq!(
            (s.streams_opened, s.streams_broken, s.cut_by_kill),
            (2, 1, 1)
        );
        assert_eq!(s.breaks_by_kind["peer-kill"], 1);
        assert_eq!((s.bytes_a_to_b, s.bytes_b_to_a), (20, 30));
        assert_eq!(s.recovery["peer-kill"].never, 0);

        let mut bad = good.clone();
        bad.push(end(Seen::Client, false, 10_300, Outcome::Truncated));
        bad.push(end(Seen::Client, false, 50_000, Outcome::Reset));
        let mut c = end(Seen::Server, false, 6_000, Outcome::Corrupt);
        c.corrupted = 3;
        bad.push(c);
        let grew = Growth {
            end: Footprint {
                rss_kib: 60_000,
                fds: 80,
            },
            ..flat
        };
        let s = judge(1, 0, 60_000, &bad, &faults, vec![grew]);
        assert_eq!(s.failures.len(), 4, "{:?}", s.failures);
        assert_eq!((s.truncated, s.unexplained, s.corrupted_bytes), (1, 1, 3));
        assert!(s.to_string().contains("FAIL"));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"corrupted_bytes\":3"), "{json}");
        // Counted in full, listed in part.
        let many: Vec<End> = (0..30)
            .map(|i| end(Seen::Client, false, 70_000 + i, Outcome::Truncated))
            .collect();
        let s = judge(1, 0, 80_000, &many, &faults, vec![]);
        assert_eq!((s.truncated, s.truncated_list.len()), (30, LISTED));
        assert_eq!((s.unexplained, s.unexplained_list.len()), (30, LISTED));
        assert!(s
            .failures
            .contains(&"30 streams silently truncated".to_owned()));
        // Nothing recovered at all.
        let s = judge(1, 0, 60_000, &good[..4], &faults, vec![]);
        assert!(
            s.failures.iter().any(|f| f.contains("not recovered")),
            "{:?}",
            s.failures
        );
    }
}
