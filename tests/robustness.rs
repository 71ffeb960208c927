//! Bad input and big images: any number of layers, bounded nesting and messages, the step's
//! own exit status kept apart from the sandbox's, and build files that are not UTF-8.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn env() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = busybox_dir();
    let root = t.path().join("root");
    (t, root)
}

fn try_build(root: &Path, ctx: &Path, extra: &[&str]) -> std::process::Output {
    run(build_cmd(root).args(extra).arg(ctx))
}

#[test]
fn a_150_step_build_and_a_130_layer_base_take_more_layers() {
    let (t, root) = env();
    let ctx = t.path().join("many");
    let mut file = String::from("FROM busybox:test\n");
    for i in 0..150 {
        file.push_str(&format!("RUN echo {i} > /f{i}\n"));
    }
    write(&ctx.join("Buildfile"), &file);
    let layout = t.path().join("many-layout");
    let out = try_build(&root, &ctx, &["-o", &format!("oci:{}:t", layout.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok(
        tool("oci-image-tool")
            .args(["validate", "--type", "image", "--ref", "name=t"])
            .arg(&layout),
    );
    // That image (151 layers) as a base, with RUN and COPY on top.
    let ctx2 = t.path().join("on-top");
    write(&ctx2.join("extra.txt"), "extra\n");
    write(
        &ctx2.join("Buildfile"),
        &format!(
            "FROM oci:{}:t\nRUN cat /f0 /f149 > /both\nCOPY extra.txt /extra.txt\nRUN cat /both /extra.txt\n",
            layout.display()
        ),
    );
    let local = t.path().join("rootfs");
    let out = try_build(&root, &ctx2, &["-o", &format!("local:{}", local.display())]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(fs::read_to_string(local.join("both")).unwrap(), "0\n149\n");
    assert!(log.contains("extra"), "{log}");
    assert!(!log.contains("copy snapshotter"), "no fallback: {log}");
}

#[test]
fn past_overlayfs_stacking_limit_older_layers_are_flattened() {
    let (t, root) = env();
    let ctx = t.path().join("deep");
    let mut file = String::from("FROM busybox:test\n");
    for i in 0..505 {
        file.push_str(&format!("RUN echo {i} > /f{i}\n"));
    }
    file.push_str("RUN rm /f3 && cat /f0 /f504 && ls / | wc -l\n");
    write(&ctx.join("Buildfile"), &file);
    let local = t.path().join("rootfs");
    let out = try_build(&root, &ctx, &["-o", &format!("local:{}", local.display())]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert!(local.join("f504").is_file() && !local.join("f3").exists());
    let flattened = fs::read_dir(root.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("flat").is_dir())
        .count();
    assert!(
        flattened >= 1,
        "older layers were flattened into a cached snapshot"
    );
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
}

#[test]
fn a_step_exiting_125_is_the_steps_own_failure() {
    let (t, root) = env();
    let ctx = t.path().join("c");
    write(&ctx.join("Buildfile"), "FROM busybox:test\nRUN exit 125\n");
    let out = try_build(&root, &ctx, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("exit code 125"), "{err}");
    assert!(!err.contains("could not start"), "{err}");
}

#[test]
fn exec_form_finds_the_command_on_the_images_path() {
    let (t, root) = env();
    let ctx = t.path().join("c");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nRUN [\"ls\", \"/bin/busybox\"]\nENV PATH=/nowhere\nRUN [\"/bin/ls\", \"/\"]\n",
    );
    let out = try_build(&root, &ctx, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn deep_nesting_is_an_error_with_a_position_and_a_bounded_message() {
    let (t, root) = env();
    let ctx = t.path().join("c");
    let deep = format!("{}x{}", "${a:-".repeat(3000), "}".repeat(3000));
    write(
        &ctx.join("Buildfile"),
        &format!("FROM busybox:test\nARG a\nENV X={deep}\n"),
    );
    let out = try_build(&root, &ctx, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "an error, not an abort");
    assert!(
        err.contains("Buildfile:3:1") && err.contains("nested more than"),
        "{}",
        &err[..err.len().min(2000)]
    );
    assert!(err.len() < 2000, "the message is {} bytes", err.len());
}

#[test]
fn a_failing_200000_line_run_gives_a_short_error() {
    let (t, root) = env();
    let ctx = t.path().join("c");
    let mut file = String::from("FROM busybox:test\nRUN false");
    for i in 0..200_000 {
        file.push_str(&format!(" \\\n  x{i}"));
    }
    file.push('\n');
    write(&ctx.join("Buildfile"), &file);
    let out = try_build(&root, &ctx, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let last = err.lines().rev().take(30).collect::<Vec<_>>().join("\n");
    assert!(
        last.len() < 4000,
        "the error is {} bytes: {}",
        last.len(),
        &last[..last.len().min(1000)]
    );
}

#[test]
fn a_build_file_that_is_not_utf8_is_an_error_at_its_position() {
    let (t, root) = env();
    let ctx = t.path().join("c");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Buildfile"),
        b"FROM busybox:test\nLABEL a=\"caf\xe9\"\n",
    )
    .unwrap();
    let out = try_build(&root, &ctx, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Buildfile:2:13") && err.contains("UTF-8"),
        "{err}"
    );
}

#[test]
fn a_build_arg_from_a_non_utf8_environment_variable_is_an_error() {
    use std::os::unix::ffi::OsStrExt;
    let (t, root) = env();
    let ctx = t.path().join("c");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nARG X\nRUN echo $X\n",
    );
    let out = run(builder()
        .env("X", std::ffi::OsStr::from_bytes(b"caf\xe9"))
        .args(["build", "--progress", "plain", "--build-arg", "X", "--root"])
        .arg(&root)
        .arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--build-arg X") && err.contains("UTF-8"),
        "{err}"
    );
}

#[test]
fn ignore_patterns_that_backtrack_exponentially_elsewhere_match_at_once() {
    // 2,000 files with long names against patterns that are exponential for a backtracking
    // matcher: the whole build must still finish (the matcher's step bound is unit-tested).
    let (t, root) = env();
    let ctx = t.path().join("c");
    for i in 0..2000 {
        write(&ctx.join(format!("d/{}{}.txt", "a".repeat(60), i)), "x");
    }
    write(
        &ctx.join(".dockerignore"),
        "**/**/**/**/**/**/x*y*z*\na*a*a*a*a*a*a*a*a*b\n**/a*a*a*a*a*a*a*a*a*a*a*a*b*\n",
    );
    write(&ctx.join("Buildfile"), "FROM busybox:test\nCOPY . /c/\n");
    let out = try_build(&root, &ctx, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small tmpfs of this test's own, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn new(at: &Path) -> SmallDisk {
        fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k"),
        )
        .unwrap();
        SmallDisk(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_during_an_export_names_the_output_and_leaves_nothing() {
    let (t, root) = env();
    let ctx = t.path().join("c");
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("big.bin"), &big).unwrap();
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY big.bin /big.bin\n",
    );
    let disk = SmallDisk::new(&t.path().join("small"));
    for output in [
        format!("oci-archive:{}/out.tar", disk.0.display()),
        format!("docker-archive:{}/out.tar", disk.0.display()),
        format!("oci:{}/layout:t", disk.0.display()),
    ] {
        let out = try_build(&root, &ctx, &["-o", &output]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{output}");
        let err: String = log
            .lines()
            .filter(|l| l.starts_with("error") || l.contains("Caused by"))
            .collect();
        assert!(
            err.contains(&disk.0.display().to_string()),
            "{output}: the error names the output: {log}"
        );
        assert!(
            !err.contains("big.bin") && !err.contains("/root/"),
            "{output}: not the source: {err}"
        );
        let left: Vec<String> = walkdir::WalkDir::new(&disk.0)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "{output}: temp files left: {left:?}");
        assert!(
            !disk.0.join("out.tar").exists(),
            "{output}: no partial archive"
        );
    }
}
