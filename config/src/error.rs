//! Located configuration errors.
//!
//! serde reports a byte span for syntax and type errors; the validation pass
//! reports a dotted key path instead (`forward[1].peer`). Both end up as a
//! line and column: a key path is looked up in a spanned parse of the same
//! document, so a user is always pointed at the line to fix.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but a value in it is wrong.
    #[error("{}", Located { path, line: *line, column: *column, key, message })]
    Invalid {
        /// The file that holds the mistake.
        path: PathBuf,
        /// 1-based line of the offending key or value (0 when unknown).
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted key path, e.g. `forward[1].peer` (empty for syntax errors).
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

struct Located<'a> {
    path: &'a Path,
    line: usize,
    column: usize,
    key: &'a str,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySeg {
    /// A table key.
    Key(&'static str),
    /// An index into an array (of tables).
    Index(usize),
}

/// A validation failure before it is located in the source text.
#[derive(Debug, Clone)]
pub(crate) struct Violation {
    pub(crate) path: Vec<KeySeg>,
    pub(crate) message: String,
}

impl Violation {
    pub(crate) fn new(path: Vec<KeySeg>, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

pub(crate) fn dotted(path: &[KeySeg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            KeySeg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            KeySeg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Turns a byte offset into a 1-based (line, column).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// Finds the span of the value at `path` in the document, falling back to the
/// nearest enclosing item that exists (e.g. the `[[forward]]` table when the
/// missing key is inside it).
fn span_of(text: &str, path: &[KeySeg]) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut best = None;
    let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    for seg in path {
        let next = match (seg, table, value) {
            (KeySeg::Key(k), Some(t), _) => {
                t.iter()
                    .find(|(key, _)| key.get_ref() == k)
                    .map(|(key, v)| {
                        best = Some(key.span());
                        v
                    })
            }
            (KeySeg::Index(i), _, Some(v)) => match v.get_ref() {
                DeValue::Array(items) => items.get(*i),
                _ => None,
            },
            _ => None,
        };
        let Some(next) = next else { break };
        if matches!(seg, KeySeg::Index(_)) {
            best = Some(next.span());
        }
        table = match next.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
        value = Some(next);
    }
    best
}

impl ConfigError {
    /// Builds the error for a serde failure, using its span.
    pub(crate) fn from_toml(path: &Path, text: &str, err: &toml::de::Error) -> Self {
        let (line, column) = err.span().map_or((0, 0), |s| line_col(text, s.start));
        Self::Invalid {
            path: path.to_owned(),
            line,
            column,
            key: String::new(),
            message: err.message().trim().to_owned(),
        }
    }

    /// Builds the error for a validation failure, locating its key path.
    pub(crate) fn from_violation(path: &Path, text: &str, v: Violation) -> Self {
        let (line, column) = span_of(text, &v.path).map_or((0, 0), |s| line_col(text, s.start));
        Self::Invalid {
            path: path.to_owned(),
            line,
            column,
            key: dotted(&v.path),
            message: v.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 4));
    }

    #[test]
    fn key_paths_resolve_to_the_right_line() {
        let text = "name = \"x\"\n\n[[forward]]\nlisten = \"a\"\n\n[[forward]]\npeer = \"bob\"\n";
        let span = span_of(
            text,
            &[
                KeySeg::Key("forward"),
                KeySeg::Index(1),
                KeySeg::Key("peer"),
            ],
        )
        .unwrap();
        assert_eq!(line_col(text, span.start).0, 7);
        // A key that is absent falls back to its enclosing table.
        let span = span_of(
            text,
            &[
                KeySeg::Key("forward"),
                KeySeg::Index(0),
                KeySeg::Key("peer"),
            ],
        )
        .unwrap();
        assert_eq!(line_col(text, span.start).0, 3);
        assert_eq!(
            dotted(&[
                KeySeg::Key("forward"),
                KeySeg::Index(1),
                KeySeg::Key("peer")
            ]),
            "forward[1].peer"
        );
    }
}
