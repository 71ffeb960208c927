//! Reproducible by default: clean builds agree whatever the context path, umask, file mtimes
//! or --jobs; `builder build --verify` proves it or shows the difference; `builder diff`
//! names every kind of difference precisely.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn copy_dir(from: &Path, to: &Path, mtime: i64) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let dst = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            fs::create_dir_all(&dst).unwrap();
        } else {
            fs::copy(e.path(), &dst).unwrap();
        }
        let ts = nix::sys::time::TimeSpec::new(mtime, 0);
        nix::sys::stat::utimensat(
            None,
            &dst,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

/// Build from a fresh root and a fresh copy of `ctx` at `mtime`, under `umask`, with `jobs`.
fn clean_build(t: &Path, name: &str, ctx: &Path, mtime: i64, umask: &str, jobs: &str) -> String {
    let root = t.join(format!("root-{name}"));
    busybox_base(&root, "busybox:test");
    let copy = t.join(format!("some/other/path/ctx-{name}"));
    copy_dir(ctx, &copy, mtime);
    let bin = env!("CARGO_BIN_EXE_builder");
    let out = run_ok(
        std::process::Command::new("sh")
            .env_remove("SOURCE_DATE_EPOCH")
            .arg("-c")
            .arg(format!(
                "umask {umask}; exec {bin} build --progress quiet --jobs {jobs} --root {} {}",
                root.display(),
                copy.display()
            )),
    );
    out.trim().to_string()
}

fn check_reproducible(buildfile: &str) {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx.join("app/main.txt"), "main\n");
    write(&ctx.join("app/lib/util.txt"), "util\n");
    write(&ctx.join("Buildfile"), buildfile);
    let a = clean_build(t.path(), "a", &ctx, 1_700_000_000, "022", "1");
    let b = clean_build(t.path(), "b", &ctx, 1_750_000_000, "077", "4");
    assert!(a.starts_with("sha256:"));
    assert_eq!(
        a, b,
        "two clean builds must give the same digest without any flag"
    );
}

#[test]
fn scratch_build_is_reproducible() {
    check_reproducible("FROM scratch\nCOPY app/ /app/\nENV A=1\nWORKDIR /app\nLABEL x=y\n");
}

#[test]
fn run_heavy_build_is_reproducible() {
    check_reproducible(
        "FROM busybox:test\nCOPY app /app\nRUN mkdir -p /out && for i in 1 2 3 4 5; do echo $i > /out/$i; done\nRUN touch /out/late && rm /out/3 && chmod 700 /out\nRUN echo done > /done\n",
    );
}

#[test]
fn multi_stage_build_is_reproducible() {
    check_reproducible(
        "FROM busybox:test AS build\nCOPY app /src\nRUN cat /src/main.txt /src/lib/util.txt > /bundle\nFROM scratch AS other\nCOPY app/lib /lib\nFROM busybox:test\nCOPY --from=build /bundle /bundle\nCOPY --from=other /lib /lib2\n",
    );
}

#[test]
fn verify_passes_for_deterministic_builds_and_names_the_nondeterministic_file() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    write(&ctx.join("f"), "f");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY f /f\nRUN echo stable > /stable\n",
    );
    let out = run_ok(
        builder()
            .args([
                "build",
                "--verify",
                "--progress",
                "plain",
                "-t",
                "ok:1",
                "--root",
            ])
            .arg(&root)
            .arg(&ctx),
    );
    assert!(out.trim().starts_with("sha256:"));
    run_ok(builder().args(["inspect", "--root"]).arg(&root).arg("ok:1"));

    write(&ctx.join("Buildfile"), "FROM busybox:test\nCOPY f /f\nRUN date > /stamp && cat /proc/sys/kernel/random/uuid >> /stamp\n");
    let out = run(builder()
        .args(["build", "--verify", "--progress", "quiet", "--root"])
        .arg(&root)
        .arg(&ctx));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not reproducible"), "{err}");
    assert!(
        err.contains("changed /stamp: content"),
        "the diff names the file: {err}"
    );
}

#[test]
fn diff_reports_content_mode_deletion_and_config_precisely() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    write(&ctx.join("f"), "one");
    let base = "FROM busybox:test\nCOPY f /data/f\n";
    let variants = [
        ("base", format!("{base}RUN chmod 644 /data/f\nENV MODE=a\n")),
        (
            "content",
            format!("{base}RUN chmod 644 /data/f && echo more >> /data/f\nENV MODE=a\n"),
        ),
        ("mode", format!("{base}RUN chmod 600 /data/f\nENV MODE=a\n")),
        (
            "deleted",
            format!("{base}RUN chmod 644 /data/f && rm /bin/wc\nENV MODE=a\n"),
        ),
        (
            "config",
            format!("{base}RUN chmod 644 /data/f\nENV MODE=b\n"),
        ),
    ];
    for (name, file) in &variants {
        write(&ctx.join("Buildfile"), file);
        build(&root, &ctx, &["-t", &format!("v:{name}")]);
    }
    let diff = |b: &str| {
        let out = run(builder()
            .args(["diff", "--root"])
            .arg(&root)
            .args(["v:base", b]));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, same) = diff("v:base");
    assert_eq!(code, Some(0));
    assert!(same.starts_with("identical"));
    let (code, out) = diff("v:content");
    assert_eq!(code, Some(1));
    assert!(
        out.contains("  changed /data/f: content (3 bytes -> 8 bytes)"),
        "{out}"
    );
    assert!(out.contains("merged changed /data/f: content"), "{out}");
    let (_, out) = diff("v:mode");
    assert!(
        out.contains("  changed /data/f: mode 0644 -> 0600"),
        "{out}"
    );
    let (_, out) = diff("v:deleted");
    assert!(out.contains("  deleted /bin/wc"), "{out}");
    assert!(out.contains("merged removed /bin/wc"), "{out}");
    let (_, out) = diff("v:config");
    assert!(
        out.contains("config config.Env[1]: \"MODE=a\" -> \"MODE=b\""),
        "{out}"
    );
    let json = run(builder()
        .args(["diff", "--format", "json", "--root"])
        .arg(&root)
        .args(["v:base", "v:mode"]));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["identical"], false);
}
