//! The module graph as the README draws it: the solver runs ops and never reads build-file
//! syntax or the frontend; `syntax`, `plan` and `oci` import nothing stateful; no module
//! imports one that imports it back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `src/` with the top-level modules its files name as `crate::X`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap();
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
        let text = std::fs::read_to_string(path).unwrap();
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
