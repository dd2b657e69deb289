//! The module graph stays one-way (docs/architecture.md): no two files import each
//! other, directly or through others in between, and no two top-level modules do.
//! A folder's `mod.rs` declares its files and re-exports from them; its files
//! never refer back to it. Read from the sources' `crate::`, `super::` and `self::`
//! paths and a `mod.rs`'s paths into its own files; test code is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

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

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The paths after each `marker` (`crate::` or `super::`), as segments.
fn paths_after<'a>(text: &'a str, marker: &str) -> Vec<Vec<&'a str>> {
    text.match_indices(marker)
        .map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            rest[..end].split("::").filter(|s| !s.is_empty()).collect()
        })
        .collect()
}

/// The longest known module that `path` (from `base`) names.
fn resolve(known: &BTreeSet<Module>, base: &[String], path: &[&str]) -> Option<Module> {
    let mut full: Module = base.to_vec();
    full.extend(path.iter().map(|s| s.to_string()));
    (1..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|m| known.contains(m))
}

/// The text before the file's inline test module (`#[cfg(test)]`, other
/// attributes, `mod tests {`); a `#[cfg(test)] mod x;` declaration is kept.
fn without_tests(text: &str) -> &str {
    let mut from = 0;
    while let Some(i) = text[from..].find("#[cfg(test)]") {
        let at = from + i;
        let mut rest = text[at + "#[cfg(test)]".len()..].trim_start();
        while rest.starts_with("#[") {
            rest = rest[rest.find(']').map_or(rest.len(), |e| e + 1)..].trim_start();
        }
        for vis in ["pub(crate) ", "pub(super) ", "pub "] {
            rest = rest.strip_prefix(vis).unwrap_or(rest);
        }
        let header_end = rest.find(['{', ';']).unwrap_or(rest.len());
        if rest.starts_with("mod ") && rest[header_end..].starts_with('{') {
            return &text[..at];
        }
        from = at + 1;
    }
    text
}

/// The first segments of the paths a file names without `crate::` or `super::`
/// (`child::…`, `self::child::…`): in a folder's `mod.rs`, its own files.
fn first_segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("::") {
        let start = text[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        let name = &text[start..i];
        let head = &text[..start];
        if (!head.ends_with("::") || head.ends_with("self::"))
            && name.starts_with(|c: char| c.is_ascii_lowercase())
        {
            out.push(name);
        }
    }
    out
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // The crate roots only declare; test-only files are test code.
    let files: Vec<_> = files
        .into_iter()
        .filter(|f| {
            !["main.rs", "lib.rs", "tests.rs", "testutil.rs"]
                .iter()
                .any(|n| f.ends_with(n))
        })
        .collect();
    let known: BTreeSet<Module> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let me = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = without_tests(&text);
        // `super::` from `a/b.rs` or `a/b/mod.rs` means `a`.
        let parent = &me[..me.len() - 1];
        let mut deps = BTreeSet::new();
        for p in paths_after(code, "crate::") {
            deps.extend(resolve(&known, &[], &p));
        }
        for p in paths_after(code, "super::") {
            deps.extend(
                resolve(&known, parent, &p)
                    .or_else(|| known.contains(parent).then(|| parent.to_vec())),
            );
        }
        for name in first_segments(code) {
            let mut child = me.clone();
            child.push(name.to_owned());
            if known.contains(&child) {
                deps.insert(child);
            }
        }
        deps.remove(&me);
        edges.insert(me, deps);
    }
    edges
}

/// Every module `from` reaches by following imports.
fn reachable(edges: &BTreeMap<Module, BTreeSet<Module>>, from: &Module) -> BTreeSet<Module> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.clone()];
    while let Some(m) = todo.pop() {
        for d in edges.get(&m).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn no_file_imports_one_that_imports_it_back() {
    let edges = graph();
    let mut cycles = Vec::new();
    for (a, deps) in &edges {
        for b in deps {
            if reachable(&edges, b).contains(a) {
                cycles.push(format!(
                    "{} -> {} -> … -> {}",
                    a.join("::"),
                    b.join("::"),
                    a.join("::")
                ));
            }
        }
    }
    // Between top-level modules, through any of their files.
    let mut top: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, deps) in &edges {
        for b in deps {
            if a[0] != b[0] {
                top.entry(a[0].as_str()).or_default().insert(b[0].as_str());
            }
        }
    }
    for (a, deps) in &top {
        for b in deps {
            if a < b && top.get(b).is_some_and(|d| d.contains(a)) {
                cycles.push(format!("module {a} <-> module {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "imports pointing back: {cycles:#?}");
    // The reading finds what is there: a sibling import, a mod.rs's path into its
    // own file, and a fair number of edges in all.
    let has = |from: &[&str], to: &[&str]| {
        let (from, to): (Module, Module) = (
            from.iter().map(|s| s.to_string()).collect(),
            to.iter().map(|s| s.to_string()).collect(),
        );
        edges.get(&from).is_some_and(|d| d.contains(&to))
    };
    assert!(has(&["server", "conn"], &["server", "guard"]), "{edges:?}");
    assert!(
        has(&["token", "provider"], &["token", "flight"]),
        "{edges:?}"
    );
    assert!(has(&["token"], &["token", "provider"]), "{edges:?}");
    let count: usize = edges.values().map(BTreeSet::len).sum();
    assert!(count > 150, "the imports were not read: {count} edges");
}
