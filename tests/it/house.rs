//! The module graph stays one-way (docs/architecture.md): no two top-level modules
//! import each other, and no two sibling files do. Inside a folder, `mod.rs` and
//! its files may refer to each other (a trait and its implementations, `Provider`
//! and the parts beside it); that is the one exception. Read from the sources'
//! `crate::` and `super::` paths, test code left out.

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

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let files: Vec<_> = files
        .into_iter()
        .filter(|f| !f.ends_with("main.rs") && !f.ends_with("lib.rs"))
        .collect();
    let known: BTreeSet<Module> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let me = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
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
        deps.remove(&me);
        edges.insert(me, deps);
    }
    edges
}

fn is_parent(a: &Module, b: &Module) -> bool {
    b.len() == a.len() + 1 && b.starts_with(a)
}

#[test]
fn no_module_or_sibling_file_imports_one_that_imports_it_back() {
    let edges = graph();
    let mut cycles = Vec::new();
    for (a, deps) in &edges {
        for b in deps {
            let back = edges.get(b).is_some_and(|d| d.contains(a));
            if back && a < b && !is_parent(a, b) && !is_parent(b, a) {
                cycles.push(format!("{} <-> {}", a.join("::"), b.join("::")));
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
    assert!(
        edges.len() > 50,
        "the sources were not read: {}",
        edges.len()
    );
}
