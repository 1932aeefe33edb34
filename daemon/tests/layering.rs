//! Imports between the daemon's top-level modules run one way.
//!
//! Reads `daemon/src/**/*.rs`, collects the `crate::<top>` paths each
//! top-level module (a file or folder directly under `src/`) uses, and
//! asserts the graph has no cycle. A cycle is printed in full, so the fix
//! starts from the edge that should not exist. Paths inside a module
//! (`super::`, `self::`) are that module's own business and not counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files whose imports are not a layer's: the binary and the crate root
/// (which only declares and re-exports modules).
const ROOTS: [&str; 2] = ["main", "lib"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/peer/state.rs` → `peer`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str();
    Path::new(first)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Every `crate::name` (and `crate::{a, b::c}`) in `text`, outside line
/// comments.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `punch_crate::`
            }
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for part in inner.split(',') {
                    let name: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        refs.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    refs.insert(name);
                }
            }
        }
    }
    refs
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let tops: BTreeSet<String> = files.iter().map(|f| top_module(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = top_module(&src, file);
        if ROOTS.contains(&from.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let to = edges.entry(from.clone()).or_default();
        for r in crate_refs(&text) {
            // `crate::start` and other root re-exports resolve to `daemon`.
            let r = if tops.contains(&r) {
                r
            } else {
                "daemon".to_owned()
            };
            if r != from {
                to.insert(r);
            }
        }
    }
    edges
}

/// A cycle through the graph, as the list of modules on it, if any.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let at = stack.iter().position(|n| n == node).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// Groups of two or more modules that all reach each other (the strongly
/// connected components), for the failure message.
fn tangles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            for next in edges.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|k| (k, reach(k))).collect();
    let mut groups: Vec<Vec<String>> = Vec::new();
    for (node, r) in &reaches {
        if !r.contains(*node) || groups.iter().any(|g| g.contains(node)) {
            continue;
        }
        let group: Vec<String> = reaches
            .iter()
            .filter(|(other, ro)| r.contains(**other) && ro.contains(*node))
            .map(|(other, _)| (*other).clone())
            .collect();
        groups.push(group);
    }
    groups
}

#[test]
fn top_level_modules_import_one_way() {
    let edges = graph();
    if let Some(cycle) = find_cycle(&edges) {
        let mut map = String::new();
        for (from, to) in &edges {
            let to: Vec<_> = to.iter().map(String::as_str).collect();
            map.push_str(&format!("  {from} → {}\n", to.join(", ")));
        }
        let groups: Vec<String> = tangles(&edges)
            .iter()
            .map(|g| format!("{{{}}}", g.join(", ")))
            .collect();
        panic!(
            "import cycle between top-level modules: {}\nmodules tangled together: {}\nall edges:\n{map}",
            cycle.join(" → "),
            groups.join(" ")
        );
    }
}

#[test]
fn the_checker_sees_cycles_and_grouped_imports() {
    let refs = crate_refs("use crate::{a, b::c};\nuse crate::d::e; // crate::f\npunch_crate::g");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["a", "b", "d"].map(String::from)
    );
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(find_cycle(&edges).unwrap(), ["a", "b", "a"]);
    edges.remove("b");
    assert_eq!(find_cycle(&edges), None);
}
