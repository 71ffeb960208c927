//! The module graph as the README draws it: the solver runs ops and never reads build-file
//! syntax or the frontend; `syntax`, `plan` and `oci` import nothing stateful; no module
//! imports one that imports it back, and no file either (a `mod.rs` naming its own
//! submodules is how Rust declares them, so that edge alone does not count); only
//! `src/store/` joins paths onto the store's root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file of `src/`: its path relative to `src/`, and its text.
fn source_files() -> Vec<(std::path::PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(&src).unwrap().to_path_buf();
            files.push((rel, std::fs::read_to_string(path).unwrap()));
        }
    }
    files
}

/// Each top-level module of `src/` with the top-level modules its files name as `crate::X`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in source_files() {
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn the_solver_knows_no_build_file_syntax() {
    let g = module_graph();
    let solver = &g["solver"];
    assert!(
        !solver.contains("syntax"),
        "solver imports syntax: {solver:?}"
    );
    assert!(
        !solver.contains("frontend"),
        "solver imports frontend: {solver:?}"
    );
    assert!(
        solver.contains("plan"),
        "solver runs plan's ops: {solver:?}"
    );
}

#[test]
fn pure_modules_import_only_pure_modules() {
    let g = module_graph();
    let pure: BTreeSet<&str> = ["syntax", "plan", "oci", "text"].into();
    for m in &pure {
        for d in &g[*m] {
            assert!(pure.contains(d.as_str()), "{m} imports {d}");
        }
    }
    assert!(
        !g["plan"].contains("syntax"),
        "plan is plain data, not syntax"
    );
}

#[test]
fn modules_have_no_import_cycle() {
    let g = module_graph();
    // Depth-first search for a back edge.
    fn visit<'a>(
        m: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        state.insert(m, 1);
        path.push(m);
        for d in g.get(m).into_iter().flatten() {
            match state.get(d.as_str()) {
                None => visit(d, g, state, path),
                Some(1) => panic!("import cycle: {} -> {}", path.join(" -> "), d),
                _ => {}
            }
        }
        path.pop();
        state.insert(m, 2);
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if !state.contains_key(m.as_str()) {
            visit(m, &g, &mut state, &mut Vec::new());
        }
    }
}

/// Every file of `src/` as its module path (`oci/layer.rs` is `["oci", "layer"]`), with the
/// files it names: through `crate::`, `super::`, `self::` or a child module's name, in
/// `use` trees too. Line comments are left out (a doc link is not an import).
fn file_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for (rel, text) in source_files() {
        let mut module: Vec<String> = rel
            .components()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .collect();
        if module.last().is_some_and(|l| l == "mod") {
            module.pop();
        }
        if module == ["lib"] || module == ["main"] {
            continue;
        }
        let text: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        files.insert(module, text);
    }
    let modules: BTreeSet<Vec<String>> = files.keys().cloned().collect();
    // The longest module a path names.
    let resolve = |path: &[String]| -> Option<Vec<String>> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| modules.contains(p))
    };
    let mut graph = BTreeMap::new();
    for (module, text) in &files {
        let mut named: Vec<Vec<String>> = Vec::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let starts_word = i == 0
                || !(bytes[i - 1].is_ascii_alphanumeric()
                    || bytes[i - 1] == b'_'
                    || bytes[i - 1] == b':');
            let char_len = text[i..].chars().next().map_or(1, |c| c.len_utf8());
            if !starts_word {
                i += char_len;
                continue;
            }
            let rest = &text[i..];
            let (base, skip): (Vec<String>, usize) = if rest.starts_with("crate::") {
                (Vec::new(), 7)
            } else if rest.starts_with("self::") {
                (module.clone(), 6)
            } else if rest.starts_with("super::") {
                let mut base = module.clone();
                let mut skip = 0;
                while text[i + skip..].starts_with("super::") {
                    base.pop();
                    skip += 7;
                }
                (base, skip)
            } else {
                // A child module named without a prefix (`copy::stage` in `solver`).
                let word: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let mut child = module.clone();
                child.push(word.clone());
                if !word.is_empty()
                    && rest[word.len()..].starts_with("::")
                    && modules.contains(&child)
                {
                    (module.clone(), 0)
                } else {
                    i += if word.is_empty() {
                        char_len
                    } else {
                        word.len()
                    };
                    continue;
                }
            };
            let (paths, used) = use_tree(&text[i + skip..]);
            for p in paths {
                let mut full = base.clone();
                full.extend(p);
                named.push(full);
            }
            i += skip + used.max(1);
        }
        let deps: BTreeSet<Vec<String>> = named
            .iter()
            .filter_map(|p| resolve(p))
            .filter(|m| !m.starts_with(module))
            .collect();
        graph.insert(module.clone(), deps);
    }
    graph
}

/// The paths a `use` tree (or a plain path) at the start of `text` names, and how many bytes
/// it took: `a::{b, c::d}` is `[a, b]` and `[a, c, d]`.
fn use_tree(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    let mut i = 0;
    loop {
        let word: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !word.is_empty() {
            i += word.len();
            prefix.push(word);
            if text[i..].starts_with("::") {
                i += 2;
                continue;
            }
            return (vec![prefix], i);
        }
        if text[i..].starts_with('{') {
            i += 1;
            let mut out = Vec::new();
            loop {
                let skipped = text[i..].len() - text[i..].trim_start().len();
                i += skipped;
                if text[i..].starts_with('}') || i >= text.len() {
                    return (out, i + 1);
                }
                let (paths, used) = use_tree(&text[i..]);
                for p in paths {
                    let mut full = prefix.clone();
                    full.extend(p);
                    out.push(full);
                }
                i += used.max(1);
                // Past ` as name`, to the comma or the closing brace.
                while i < text.len() && !text[i..].starts_with(',') && !text[i..].starts_with('}') {
                    i += text[i..].chars().next().map_or(1, |c| c.len_utf8());
                }
                if text[i..].starts_with(',') {
                    i += 1;
                }
            }
        }
        return (vec![prefix], i);
    }
}

#[test]
fn files_have_no_import_circle() {
    let g = file_graph();
    let mut circles = Vec::new();
    fn visit<'a>(
        m: &'a Vec<String>,
        g: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<&'a Vec<String>, u8>,
        path: &mut Vec<&'a Vec<String>>,
        circles: &mut Vec<String>,
    ) {
        state.insert(m, 1);
        path.push(m);
        for d in g.get(m).into_iter().flatten() {
            match state.get(d) {
                None => visit(d, g, state, path, circles),
                Some(1) => {
                    let from = path.iter().position(|p| *p == d).unwrap_or(0);
                    let names: Vec<String> = path[from..].iter().map(|p| p.join("::")).collect();
                    circles.push(format!("{} -> {}", names.join(" -> "), d.join("::")));
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(m, 2);
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if !state.contains_key(m) {
            visit(m, &g, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "import circles between files:\n{}",
        circles.join("\n")
    );
}

/// Every directory of the store is named by `store::layout`: no other file joins a path onto
/// the store's root (a module below the store is handed the directory it owns).
#[test]
fn no_store_path_is_joined_outside_the_store() {
    // The root joined onto, or a bucket's name joined onto anything.
    let joins = [
        "root().join(",
        "store_root.join(",
        ".join(\"cache",
        ".join(\"tmp\")",
        ".join(\"snapshots\")",
        ".join(\"converted\")",
        ".join(\"blobs\")",
        ".join(\"attested\")",
        ".join(\"registry",
        ".join(\"gc.lock\")",
        ".join(\"refs.json\")",
    ];
    let mut found = Vec::new();
    for (rel, text) in source_files() {
        if rel.starts_with("store") {
            continue;
        }
        // Unit tests make stores of their own in temporary directories.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if let Some(j) = joins.iter().find(|j| line.contains(*j)) {
                found.push(format!(
                    "{}:{}: {} ({})",
                    rel.display(),
                    n + 1,
                    line.trim(),
                    j
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "store paths joined outside src/store/:\n{}",
        found.join("\n")
    );
}
