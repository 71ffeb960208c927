//! Golden tests for the front end: `testdata/parse/<case>/Buildfile` must print
//! `expected.txt` with `builder debug parse --format buildkit-result`, and every
//! `testdata/errors/<case>/Buildfile` must fail with exactly `expected.txt` on stderr.
//! `UPDATE_GOLDEN=1 cargo test` rewrites the expected files.

mod common;

use std::fs;

use common::{builder, run, testdata};

fn cases(area: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(testdata(area))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no cases under testdata/{area}");
    v
}

fn check(case: &std::path::Path, actual: &str) -> Option<String> {
    let exp = case.join("expected.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&exp, actual).unwrap();
        return None;
    }
    let want = fs::read_to_string(&exp).unwrap_or_default();
    (want != actual).then(|| {
        format!(
            "{}:\n--- expected\n{}--- actual\n{}",
            case.display(),
            want,
            actual
        )
    })
}

#[test]
fn parse_golden_files() {
    let mut failures = Vec::new();
    for case in cases("parse") {
        let out = run(builder().current_dir(&case).args([
            "debug",
            "parse",
            "--format",
            "buildkit-result",
            "Buildfile",
        ]));
        assert!(
            out.status.success(),
            "{}: {}",
            case.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        failures.extend(check(&case, &String::from_utf8_lossy(&out.stdout)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn error_golden_files() {
    let mut failures = Vec::new();
    for case in cases("errors") {
        let mut cmd = builder();
        cmd.current_dir(&case);
        if case.join("args").is_file() {
            let args = fs::read_to_string(case.join("args")).unwrap();
            cmd.args(args.split_whitespace());
        } else {
            cmd.args(["debug", "graph", "Buildfile"]);
        }
        let out = run(&mut cmd);
        assert!(!out.status.success(), "{} should fail", case.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "{} panicked: {}",
            case.display(),
            stderr
        );
        failures.extend(check(&case, &kept_state_masked(&stderr)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A failed step's hint names where its state is kept, which differs from run to run.
fn kept_state_masked(stderr: &str) -> String {
    const HINT: &str = "builder debug shell";
    stderr
        .lines()
        .map(|l| match l.find(HINT) {
            Some(at) => format!("{}{} <store> <id>\n", &l[..at], HINT),
            None => format!("{}\n", l),
        })
        .collect()
}

#[test]
fn graph_prunes_to_target_and_groups_parallel_stages() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("Buildfile");
    fs::write(&f, "FROM scratch AS a\nCOPY a /a\nFROM scratch AS b\nCOPY b /b\nFROM scratch AS unused\nFROM a AS final\nCOPY --from=b /b /b\n").unwrap();
    let out = common::run_ok(
        builder()
            .args(["debug", "graph", "--target", "final"])
            .arg(&f),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["levels"], serde_json::json!([[0, 1], [3]]));
    let names: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "final"], "the unused stage is pruned");
}

#[test]
fn warns_about_unconsumed_build_args() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("Buildfile");
    fs::write(&f, "ARG USED\nFROM scratch\n").unwrap();
    let out = run(builder()
        .args([
            "debug",
            "graph",
            "--build-arg",
            "USED=1",
            "--build-arg",
            "TYPO=2",
        ])
        .arg(&f));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("build-arg TYPO was not consumed") && !err.contains("USED"),
        "{err}"
    );
}

#[test]
fn expand_and_ignore_debug_commands() {
    let out = common::run_ok(builder().args([
        "debug",
        "expand",
        "--words",
        "--env",
        "X=a b",
        "--",
        "1${X}2 \"$X\"",
    ]));
    assert_eq!(out.trim(), r#"["1a","b2","a b"]"#);
    let d = tempfile::tempdir().unwrap();
    let ig = d.path().join(".dockerignore");
    fs::write(&ig, "docs\n!docs/keep.md\n").unwrap();
    assert_eq!(
        common::run_ok(
            builder()
                .args(["debug", "ignore-match"])
                .arg(&ig)
                .arg("docs/a/b")
        )
        .trim(),
        "match"
    );
    assert_eq!(
        common::run_ok(
            builder()
                .args(["debug", "ignore-match"])
                .arg(&ig)
                .arg("docs/keep.md")
        )
        .trim(),
        "nomatch"
    );
}
