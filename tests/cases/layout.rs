//! The source's shape: no file imports a file that, directly or through others, imports it back
//! (test modules aside). A circle means two files can only be understood, and changed, together.
//! And the image builds: the Dockerfile copies every directory the source embeds files from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src/` (`realtime::hub`; `` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "mod").collect();
    match parts.as_slice() {
        ["lib"] | ["main"] => String::new(),
        _ => parts.join("::"),
    }
}

/// The text without `#[cfg(test)]` modules.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]\nmod ") {
        out.push_str(&rest[..at]);
        let open = rest[at..].find('{').map_or(rest.len(), |o| at + o);
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The longest module of `modules` that `path` (`a::b::Item`) names.
fn resolve<'a>(modules: &'a BTreeSet<String>, path: &str) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().find_map(|n| modules.get(&parts[..n].join("::")))
}

/// Each file's module and the modules it imports (test modules aside).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let path =
        regex::Regex::new(r"crate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)(::\{([^}]*)\})?").unwrap();
    let sup = regex::Regex::new(r"\bsuper::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)").unwrap();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let me = module_of(&src, file);
        let text = without_tests(&std::fs::read_to_string(file).expect("read"));
        let mut deps = BTreeSet::new();
        for c in path.captures_iter(&text) {
            let base = &c[1];
            let mut named = vec![base.to_owned()];
            if let Some(items) = c.get(3) {
                named = items.as_str().split(',').map(|i| format!("{base}::{}", i.trim())).collect();
            }
            for n in named {
                if let Some(m) = resolve(&modules, &n).filter(|m| **m != me && !m.is_empty()) {
                    deps.insert(m.clone());
                }
            }
        }
        let parent = me.rsplit_once("::").map_or("", |(p, _)| p);
        for c in sup.captures_iter(&text) {
            let full = if parent.is_empty() { c[1].to_owned() } else { format!("{parent}::{}", &c[1]) };
            if let Some(m) = resolve(&modules, &full).filter(|m| **m != me && !m.is_empty()) {
                deps.insert(m.clone());
            }
        }
        edges.insert(me, deps);
    }
    edges
}

/// The modules reachable from one of their own imports.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut circles = Vec::new();
    for (start, deps) in edges {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&String> = deps.iter().collect();
        while let Some(m) = stack.pop() {
            if m == start {
                circles.push(start.clone());
                break;
            }
            if seen.insert(m) {
                stack.extend(edges.get(m).into_iter().flatten());
            }
        }
    }
    circles
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let circles = circles(&imports());
    assert!(circles.is_empty(), "files in an import circle: {circles:?}");
}

/// The floors: a top-level module (`replication`, `change`, `realtime`, …) never imports one
/// that imports it back, so each floor can be read knowing only the ones below it. The crate
/// root, `main` and `bench` (which drive everything) stand outside.
#[test]
fn no_floor_imports_a_floor_that_imports_it_back() {
    let top = |m: &str| m.split("::").next().unwrap_or_default().to_owned();
    let mut floors: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, deps) in imports() {
        let me = top(&module);
        if me.is_empty() || me == "bench" {
            continue;
        }
        let entry = floors.entry(me.clone()).or_default();
        entry.extend(deps.iter().map(|d| top(d)).filter(|d| *d != me && d != "bench"));
    }
    let circles = circles(&floors);
    assert!(circles.is_empty(), "top-level modules in an import circle: {circles:?}");
}

#[test]
fn the_dockerfile_copies_every_directory_the_source_embeds_files_from() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let copied: BTreeSet<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| l.split_whitespace().rev().skip(1))
        .map(|p| p.trim_end_matches('/'))
        .collect();
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut embedded = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("source");
        for (i, _) in text.match_indices("include_") {
            let rest = &text[i..];
            let Some(args) =
                rest.strip_prefix("include_str!(\"").or_else(|| rest.strip_prefix("include_bytes!(\""))
            else {
                continue;
            };
            let relative = &args[..args.find('"').expect("a closing quote")];
            let path = file.parent().expect("a directory").join(relative);
            let path = path.canonicalize().expect("the embedded file exists");
            let top = path.strip_prefix(root.canonicalize().expect("root")).expect("inside the project");
            embedded.insert(top.iter().next().expect("a first part").to_string_lossy().into_owned());
        }
    }
    assert!(embedded.contains("migrations") && embedded.contains("assets"), "{embedded:?}");
    let missing: Vec<&String> = embedded.iter().filter(|d| !copied.contains(d.as_str())).collect();
    assert!(missing.is_empty(), "the Dockerfile does not copy {missing:?} (copied: {copied:?})");
}
