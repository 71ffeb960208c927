//! Build checks: every rule of BuildKit's set fires on its positive case (exactly the lines
//! of `expected`) and stays quiet on its negative one; `# check=error=true` fails a build with
//! the rule's name; a normal build reports findings at its end, in JSON too.

mod common;

use common::*;
use std::path::Path;

/// A store holding `arm:1` (an arm64 image) and `host:1` (one of this machine's platform).
fn store_with_bases(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("root");
    let ctx = dir.join("base-ctx");
    write(&ctx.join("Buildfile"), "FROM scratch\nCOPY f /\n");
    write(&ctx.join("f"), "f\n");
    build(&root, &ctx, &["--platform", "linux/arm64", "-t", "arm:1"]);
    build(&root, &ctx, &["-t", "host:1"]);
    root
}

fn check(root: &Path, ctx: &Path) -> (Option<i32>, String) {
    let out = run(builder()
        .args(["build", "--check", "--root"])
        .arg(root)
        .arg(ctx));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_rule_fires_on_its_positive_case_only() {
    let t = tempfile::tempdir().unwrap();
    let root = store_with_bases(t.path());
    let cases = testdata("checks");
    let mut rules: Vec<String> = std::fs::read_dir(&cases)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    rules.sort();
    assert_eq!(
        rules.len(),
        builder::frontend::checks::RULES.len(),
        "one case directory per rule"
    );
    let bless = std::env::var_os("CHECKS_BLESS").is_some();
    for rule in &rules {
        let pos = cases.join(rule).join("positive");
        let (code, out) = check(&root, &pos);
        let out = out.replace(&format!("{}/", pos.display()), "");
        if bless {
            std::fs::write(pos.join("expected"), &out).unwrap();
        }
        let expected = std::fs::read_to_string(pos.join("expected")).unwrap();
        assert_eq!(out, expected, "{rule}: positive case");
        assert!(
            out.lines().all(|l| l.contains(&format!(": {rule}: "))),
            "{rule}: only its own rule fires: {out}"
        );
        assert!(!out.is_empty() && code == Some(1), "{rule}: --check fails");
        let (code, out) = check(&root, &cases.join(rule).join("negative"));
        assert_eq!(
            (code, out.as_str()),
            (Some(0), "Check complete, no warnings found.\n"),
            "{rule}: negative case"
        );
    }
}

#[test]
fn check_directive_skips_rules_or_makes_findings_errors() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let ctx = t.path().join("ctx");
    write(&ctx.join("f"), "f\n");
    write(
        &ctx.join("Buildfile"),
        "# check=error=true\nFROM scratch\nMAINTAINER me\nCOPY f /\n",
    );
    let out = run(builder().args(["build", "--root"]).arg(&root).arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "error=true fails the build: {err}");
    assert!(
        err.contains("MaintainerDeprecated") && err.contains("Buildfile:3:1"),
        "{err}"
    );
    write(
        &ctx.join("Buildfile"),
        "# check=skip=MaintainerDeprecated;error=true\nFROM scratch\nMAINTAINER me\nCOPY f /\n",
    );
    build(&root, &ctx, &[]);
    write(
        &ctx.join("Buildfile"),
        "# check=skip=all;error=true\nFROM scratch AS Bad\nMAINTAINER me\nCOPY f /\n",
    );
    build(&root, &ctx, &[]);
}

#[test]
fn a_check_comment_above_an_instruction_applies_to_it_alone() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let ctx = t.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\n# check=skip=JSONArgsRecommended // a wrapper handles signals\nCMD run one\nENTRYPOINT run two\n# check=skip=all\nMAINTAINER me\nMAINTAINER you\n# check=experimental=InvalidDefinitionDescription\n# not a description\nARG V=1\n",
    );
    let (code, out) = check(&root, &ctx);
    let out = out.replace(&format!("{}/", ctx.display()), "");
    assert_eq!(code, Some(1), "{out}");
    let found: Vec<String> = out
        .lines()
        .map(|l| l.split(": ").take(2).collect::<Vec<_>>().join(": "))
        .collect();
    assert_eq!(
        found,
        [
            "Buildfile:4:1: JSONArgsRecommended",
            "Buildfile:7:1: MaintainerDeprecated",
            "Buildfile:10:1: InvalidDefinitionDescription",
        ],
        "{out}"
    );

    // `BUILDKIT_DOCKERFILE_CHECK` replaces the directive, as in BuildKit.
    write(
        &ctx.join("Buildfile"),
        "# check=error=true\nFROM scratch\nMAINTAINER me\n",
    );
    let out = run(builder().args(["build", "--root"]).arg(&root).arg(&ctx));
    assert!(!out.status.success(), "error=true from the directive");
    let out = run(builder()
        .args([
            "build",
            "--build-arg",
            "BUILDKIT_DOCKERFILE_CHECK=skip=MaintainerDeprecated",
            "--root",
        ])
        .arg(&root)
        .arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the build arg wins: {err}");
    assert!(!err.contains("MaintainerDeprecated"), "{err}");
    assert!(
        !err.contains("not consumed"),
        "a frontend option, not an ARG: {err}"
    );
}

#[test]
fn a_build_reports_findings_at_its_end_in_plain_and_json() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let ctx = t.path().join("ctx");
    write(&ctx.join("f"), "f\n");
    write(&ctx.join("Buildfile"), "FROM scratch\nENV A 1\nCOPY f /\n");
    let out = run(builder()
        .args(["build", "--progress", "plain", "--root"])
        .arg(&root)
        .arg(&ctx));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("Buildfile:2:1: LegacyKeyValueFormat:"),
        "the finding closes the output: {err}"
    );
    let out = run(builder()
        .args(["build", "--progress", "json", "--root"])
        .arg(&root)
        .arg(&ctx));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let event: serde_json::Value = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "check")
        .unwrap_or_else(|| panic!("no check event: {err}"));
    assert_eq!(event["rule"], "LegacyKeyValueFormat");
    assert_eq!(event["line"], 2);
    assert_eq!(event["column"], 1);
}

#[test]
fn checks_read_local_layout_and_archive_bases_without_a_network() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let base = t.path().join("base");
    write(
        &base.join("Buildfile"),
        "FROM scratch\nENV FROM_BASE=1\nCOPY f /\n",
    );
    write(&base.join("f"), "f\n");
    let layout = t.path().join("layout");
    let archive = t.path().join("base.tar");
    build(
        &root,
        &base,
        &[
            "--platform",
            "linux/amd64",
            "-o",
            &format!("oci:{}:b", layout.display()),
            "-o",
            &format!("oci-archive:{}:b", archive.display()),
        ],
    );
    for (i, from) in [
        format!("oci:{}:b", layout.display()),
        format!("oci-archive:{}:b", archive.display()),
    ]
    .iter()
    .enumerate()
    {
        let ctx = t.path().join(format!("ctx{i}"));
        write(
            &ctx.join("Buildfile"),
            &format!(
                "FROM {from}\nENV KNOWN=$FROM_BASE UNKNOWN=$NOT_DEFINED\n\nFROM --platform=linux/arm64 {from} AS other\n"
            ),
        );
        let (code, out) = check(&t.path().join("fresh-root"), &ctx);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains("UndefinedVar: Usage of undefined variable '$NOT_DEFINED'")
                && !out.contains("FROM_BASE"),
            "the base's ENV is known: {out}"
        );
        assert!(
            out.contains("InvalidBaseImagePlatform") && out.contains("expected \"linux/arm64\""),
            "{out}"
        );
    }
}
