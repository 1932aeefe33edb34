//! The Prometheus text exposition format (version 0.0.4), written by hand
//! because both binaries only ever render a snapshot of counters they already
//! hold: a registry crate would duplicate that state.
//!
//! ```
//! use punch_service::prometheus::{Exposition, Kind};
//! let mut out = Exposition::new();
//! out.family("punchd_peer_streams", Kind::Gauge, "Streams open in the tunnel.")
//!     .sample(&[("peer", "bob")], 3);
//! assert!(out.finish().contains("punchd_peer_streams{peer=\"bob\"} 3\n"));
//! ```

use std::fmt::{Display, Write as _};

/// The `Content-Type` a `/metrics` response carries.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type, as written on its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up (names end in `_total` by convention).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A whole `/metrics` document being written, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// One family's samples; returned by [`Exposition::family`].
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Exposition {
    /// An empty document.
    pub fn new() -> Self {
        Self {
            out: String::with_capacity(4096),
        }
    }

    /// Starts a family: writes its `# HELP` and `# TYPE` lines. Add its
    /// samples on the returned [`Family`]; a family with none is valid.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

impl Family<'_> {
    /// One sample line. Label values are escaped as the format requires, so
    /// a peer name or address can never break the document.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_samples_follow_the_text_format() {
        let mut out = Exposition::new();
        out.family("a_total", Kind::Counter, "Things.\nMore.")
            .sample(&[], 1)
            .sample(&[("x", "1"), ("y", "q\"\\\n")], 2.5);
        out.family("b", Kind::Gauge, "Empty family.");
        assert_eq!(
            out.finish(),
            "# HELP a_total Things.\\nMore.\n# TYPE a_total counter\na_total 1\n\
             a_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 2.5\n# HELP b Empty family.\n# TYPE b gauge\n"
        );
    }
}
