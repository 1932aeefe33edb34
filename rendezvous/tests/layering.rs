//! Imports inside `src/server` run one way: the graph of references between
//! its sibling modules (`super::x`, `crate::server::x`) has no cycle.
//!
//! A cycle means two modules are one concern split in two files, or a helper
//! lives in the wrong one; either way a reader cannot start at one end. The
//! check reads the source text rather than compiler output, so it needs no
//! extra tooling: good enough for `use` paths written the way this crate
//! writes them. Comments (a doc link points a reader elsewhere, it is not a
//! dependency) and unit-test modules (`#[cfg(test)]` to the end of a file)
//! are left out: tests may reach anywhere.

#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Sibling module → the siblings it refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn server_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server")
}

/// Every `.rs` file under `dir`, with its module path below `server`
/// (`store/memory.rs` → `["store", "memory"]`, `store/mod.rs` → `["store"]`).
fn modules(dir: &Path, prefix: &[String], out: &mut Vec<(Vec<String>, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/server is readable")
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(stem);
            modules(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut p = prefix.to_vec();
            if stem != "mod" {
                p.push(stem);
            }
            out.push((p, path));
        }
    }
}

/// The module paths (relative to `server`) that `text`, the source of the
/// module at `here`, refers to through `super::` or `crate::server::`.
fn references(here: &[String], text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = code.as_str();
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let (mut base, skip) = if let Some(r) = rest.strip_prefix("crate::server::") {
            (Vec::new(), rest.len() - r.len())
        } else if rest.starts_with("super::")
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            // Count the chain of `super::`.
            let mut r = rest;
            let mut up = 0;
            while let Some(s) = r.strip_prefix("super::") {
                r = s;
                up += 1;
            }
            let Some(keep) = here.len().checked_sub(up) else {
                i += skip_char(rest);
                continue;
            };
            (here[..keep].to_vec(), rest.len() - r.len())
        } else {
            i += skip_char(rest);
            continue;
        };
        i += skip;
        let rest = &text[i..];
        // `super::{a, b::c}` or `super::a`.
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end].split(',').collect()
        } else {
            vec![rest]
        };
        for name in names {
            let ident: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                let mut p = base.clone();
                p.push(ident);
                out.push(p);
            }
        }
        base.clear();
    }
    out
}

/// The length of the first character of `s` (source text is UTF-8).
fn skip_char(s: &str) -> usize {
    s.chars().next().map_or(1, char::len_utf8)
}

/// Edges between the top-level modules of `server` (a file in `store/`
/// counts as `store`); references to the root (`super::Shared`) and within
/// one module are not edges.
fn graph() -> Graph {
    let mut files = Vec::new();
    modules(&server_dir(), &[], &mut files);
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|(p, _)| p.first().cloned())
        .collect();
    let mut g = Graph::new();
    for (here, path) in &files {
        let Some(from) = here.first() else { continue };
        g.entry(from.clone()).or_default();
        let text = std::fs::read_to_string(path).expect("source file is readable");
        for target in references(here, &text) {
            if let Some(to) = target.first().filter(|t| tops.contains(*t)) {
                if to != from {
                    g.entry(from.clone()).or_default().insert(to.clone());
                }
            }
        }
    }
    g
}

/// A cycle in `g`, as the list of modules around it, if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &str,
        g: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(n.to_owned(), Mark::Open);
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            match marks.get(m.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let start = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(m, g, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in g.keys() {
        if marks.get(n.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(n, g, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn server_modules_import_one_way() {
    let g = graph();
    assert!(g.len() > 3, "found the server modules: {g:?}");
    if let Some(cycle) = find_cycle(&g) {
        panic!(
            "import cycle in rendezvous/src/server: {}\nwhole graph: {g:#?}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_checker_sees_references_and_cycles() {
    let here = vec!["store".to_owned(), "memory".to_owned()];
    let refs = references(
        &here,
        "use super::super::auth::x;\n/// [`super::super::relay`]\nuse super::{Store, Registration};\nuse crate::server::local::Local;\n#[cfg(test)]\nuse super::super::relay;",
    );
    assert_eq!(
        refs,
        vec![
            vec!["auth".to_owned()],
            vec!["store".to_owned(), "Store".to_owned()],
            vec!["store".to_owned(), "Registration".to_owned()],
            vec!["local".to_owned()],
        ]
    );
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(a.to_owned()).or_default().insert(b.to_owned());
    }
    assert_eq!(
        find_cycle(&g),
        Some(
            vec!["a", "b", "c", "a"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    g.get_mut("c").map(|s| s.remove("a"));
    assert_eq!(find_cycle(&g), None);
}
