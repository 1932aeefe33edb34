//! `punch-lab-tool bench-charts`: SVG line charts of the RTT bench's JSON
//! ([`super::rtt::RttBench`]): one line per path, RTT on the x axis (the
//! delayed lossless conditions; the lossy one is a hollow point at its
//! RTT; 0 ms is left to the table). Plain
//! SVG text, no dependency: a reader of the repository sees the curves.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::rtt::{RowFigures, RttBench};

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#222222", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
];

/// One chart: which figure, its title and unit.
struct Chart {
    file: &'static str,
    title: &'static str,
    unit: &'static str,
    value: fn(&RowFigures) -> Option<f64>,
}

const CHARTS: [Chart; 3] = [
    Chart {
        file: "rtt-one-stream.svg",
        title: "One stream (iperf3) by RTT",
        unit: "Gbit/s",
        value: |r| r.one_gbps,
    },
    Chart {
        file: "rtt-eight-streams.svg",
        title: "Eight streams (iperf3) by RTT",
        unit: "Gbit/s",
        value: |r| r.eight_gbps,
    },
    Chart {
        file: "rtt-rr-under-load.svg",
        title: "64 B round trip p50 during a bulk download, minus the RTT",
        unit: "ms added",
        value: |r| r.loaded_rr_p50_us.map(|v| v / 1000.0),
    },
];

/// Reads `json` and writes the charts into `out`; returns their paths.
pub fn write_charts(json: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let bench: RttBench = serde_json::from_slice(
        &std::fs::read(json).with_context(|| format!("cannot read {}", json.display()))?,
    )
    .with_context(|| format!("{} is not the RTT bench's JSON", json.display()))?;
    std::fs::create_dir_all(out)?;
    let mut files = Vec::new();
    for c in &CHARTS {
        let path = out.join(c.file);
        std::fs::write(&path, svg(&bench, c))?;
        files.push(path);
    }
    Ok(files)
}

/// The paths in the order first seen.
fn paths(b: &RttBench) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in &b.conditions {
        for r in &c.rows {
            if !out.contains(&r.path) {
                out.push(r.path.clone());
            }
        }
    }
    out
}

/// A point: RTT, value, lossy condition.
type Point = (u64, f64, bool);

/// `(rtt, value, lossy)` points of one path for one chart. The round-trip
/// chart subtracts the emulated RTT, so it shows queueing, not distance.
fn points(b: &RttBench, path: &str, c: &Chart) -> Vec<Point> {
    b.conditions
        .iter()
        .filter(|cond| cond.rtt_ms > 0)
        .filter_map(|cond| {
            let r = cond
                .rows
                .iter()
                .find(|r| r.path == path && r.skipped.is_none())?;
            let mut v = (c.value)(r)?;
            if c.file == "rtt-rr-under-load.svg" {
                v = (v - cond.rtt_ms as f64).max(0.0);
            }
            Some((cond.rtt_ms, v, cond.loss_pct > 0.0))
        })
        .collect()
}

fn svg(b: &RttBench, c: &Chart) -> String {
    // Delayed conditions only: at 0 ms the figures are CPU-bound and an
    // order of magnitude above the delay line's, and would flatten the
    // curves (they are in the table).
    let mut rtts: Vec<u64> = b
        .conditions
        .iter()
        .map(|c| c.rtt_ms)
        .filter(|r| *r > 0)
        .collect();
    rtts.sort_unstable();
    rtts.dedup();
    let names = paths(b);
    let all: Vec<(String, Vec<Point>)> =
        names.iter().map(|p| (p.clone(), points(b, p, c))).collect();
    let max = all
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let max = nice_ceiling(max);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    // RTTs are spread evenly (0, 20, 40, 100, 200 would crowd the left on
    // a linear axis).
    let x = |rtt: u64| {
        let i = rtts.iter().position(|r| *r == rtt).unwrap_or(0) as f64;
        LEFT + pw * i / (rtts.len().max(2) - 1) as f64
    };
    let y = |v: f64| TOP + ph * (1.0 - v / max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        LEFT + pw / 2.0,
        c.title
    );
    for i in 0..=5 {
        let v = max * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y(v) + 4.0,
            trim(v),
            y = y(v)
        );
    }
    for r in &rtts {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{r}</text>"#,
            x(*r),
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">RTT, ms (hollow marker: {} % loss)</text>
<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 10.0,
        b.conditions
            .iter()
            .find(|c| c.loss_pct > 0.0)
            .map_or(0.0, |c| c.loss_pct),
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        c.unit
    );
    for (i, (name, pts)) in all.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = if name.contains("(before)") {
            r#" stroke-dasharray="5,4""#
        } else {
            ""
        };
        let line: Vec<String> = pts
            .iter()
            .filter(|p| !p.2)
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        if !line.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                line.join(" ")
            );
        }
        for p in pts {
            let fill = if p.2 { "white" } else { colour };
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{fill}" stroke="{colour}" stroke-width="1.5"/>"#,
                x(p.0) + if p.2 { 8.0 } else { 0.0 },
                y(p.1)
            );
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            W - RIGHT + 15.0,
            W - RIGHT + 40.0,
            W - RIGHT + 46.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `v` (and above zero).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::super::rtt::Condition;
    use super::*;

    #[test]
    fn ceilings_are_round() {
        assert_eq!(nice_ceiling(0.28), 0.5);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn a_chart_has_a_line_per_path_and_marks_the_lossy_point() {
        let row = |path: &str, one: f64| RowFigures {
            path: path.into(),
            one_gbps: Some(one),
            ..RowFigures::default()
        };
        let b = RttBench {
            conditions: vec![
                Condition {
                    rtt_ms: 20,
                    loss_pct: 0.0,
                    rows: vec![row("plain TCP", 0.3), row("punchd TCP", 0.25)],
                },
                Condition {
                    rtt_ms: 40,
                    loss_pct: 0.0,
                    rows: vec![row("plain TCP", 0.28), row("punchd TCP", 0.2)],
                },
                Condition {
                    rtt_ms: 40,
                    loss_pct: 1.0,
                    rows: vec![row("plain TCP", 0.1)],
                },
            ],
            ..RttBench::default()
        };
        let s = svg(&b, &CHARTS[0]);
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches(r#"fill="white" stroke"#).count(), 1);
        assert!(s.contains("punchd TCP"));
    }
}
