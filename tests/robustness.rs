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

/// `builder build` of `ctx` with a hang guard, and its peak memory.
fn bounded_build(root: &Path, ctx: &Path, extra: &[&str]) -> (std::process::Output, Measured) {
    let m = run_bounded(build_cmd(root).args(extra).arg(ctx), 300);
    (
        std::process::Output {
            status: m.out.status,
            stdout: m.out.stdout.clone(),
            stderr: m.out.stderr.clone(),
        },
        m,
    )
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const MIB: u64 = 1024;

#[test]
fn expansion_bombs_end_in_an_error_at_their_line_with_bounded_memory() {
    let (t, root) = env();
    // One value doubled 26 times: a gigabyte from a 1.5 KB file.
    let ctx = t.path().join("double");
    let mut file = String::from("FROM busybox:test\nENV A=aaaaaaaaaaaaaaaa\n");
    file.push_str(&"ENV A=$A$A\n".repeat(26));
    file.push_str("RUN true\n");
    write(&ctx.join("Buildfile"), &file);
    let (out, rss) = bounded_build(&root, &ctx, &[]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("Buildfile:19:1") && log.contains("longer than 1048576 bytes"),
        "{log}"
    );
    assert!(rss.peak_under(256 * MIB), "{} KiB", rss.max_rss_kib);
    let m = run_bounded(
        builder().args(["debug", "ops"]).arg(ctx.join("Buildfile")),
        300,
    );
    assert!(
        !m.out.status.success() && m.peak_under(256 * MIB),
        "{} KiB",
        m.max_rss_kib
    );
    // Values under the word limit, repeated until the file's own limit.
    let ctx = t.path().join("repeat");
    let mut file = String::from("FROM busybox:test\nENV A=aaaaaaaaaaaaaaaa\n");
    file.push_str(&"ENV A=$A$A\n".repeat(15));
    for i in 0..400 {
        file.push_str(&format!("ENV B{i}=$A\n"));
    }
    write(&ctx.join("Buildfile"), &file);
    let (out, rss) = bounded_build(&root, &ctx, &[]);
    let log = text(&out);
    assert!(
        !out.status.success() && log.contains("more than 64 MiB"),
        "{log}"
    );
    assert!(rss.peak_under(512 * MIB), "{} KiB", rss.max_rss_kib);
    // The same through RUN environments: each step carries the big value.
    let ctx = t.path().join("runs");
    let mut file = String::from("FROM busybox:test\nENV A=aaaaaaaaaaaaaaaa\n");
    file.push_str(&"ENV A=$A$A\n".repeat(15));
    file.push_str(&"RUN true\n".repeat(400));
    write(&ctx.join("Buildfile"), &file);
    let (out, rss) = bounded_build(&root, &ctx, &[]);
    assert!(
        !out.status.success() && text(&out).contains("more than 64 MiB"),
        "{}",
        text(&out)
    );
    assert!(rss.peak_under(512 * MIB), "{} KiB", rss.max_rss_kib);
}

#[test]
fn thousands_of_stages_are_refused_at_the_first_one_past_the_limit() {
    let (t, root) = env();
    let ctx = t.path().join("stages");
    let mut file = String::from("FROM busybox:test AS s0\n");
    for i in 1..8000 {
        file.push_str(&format!("FROM s{} AS s{i}\nENV S{i}=1\n", i - 1));
    }
    write(&ctx.join("Buildfile"), &file);
    let (out, rss) = bounded_build(&root, &ctx, &[]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    // Stage 513 (s512) starts on line 2 * 512.
    assert!(
        log.contains("Buildfile:1024:1") && log.contains("more than 512 stages"),
        "{log}"
    );
    assert!(rss.peak_under(128 * MIB), "{} KiB", rss.max_rss_kib);
    // A long chain under the limit builds.
    let ctx = t.path().join("chain");
    let mut file = String::from("FROM busybox:test AS s0\n");
    for i in 1..200 {
        file.push_str(&format!("FROM s{} AS s{i}\nENV S{i}=1\n", i - 1));
    }
    file.push_str("RUN test \"$S199\" = 1\n");
    write(&ctx.join("Buildfile"), &file);
    let (out, rss) = bounded_build(&root, &ctx, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(rss.peak_under(512 * MIB), "{} KiB", rss.max_rss_kib);
}

#[test]
fn huge_ignore_files_are_refused_and_deep_names_match_in_one_pass() {
    let (t, root) = env();
    let ctx = t.path().join("ignore");
    write(&ctx.join("Buildfile"), "FROM busybox:test\nCOPY . /c/\n");
    write(&ctx.join("kept"), "k\n");
    let mut lines = String::new();
    for i in 0..1_000_000 {
        lines.push_str(&format!("file{i}\n"));
    }
    write(&ctx.join(".dockerignore"), &lines);
    let (out, rss) = bounded_build(&root, &ctx, &[]);
    let log = text(&out);
    assert!(
        !out.status.success()
            && log.contains(".dockerignore")
            && log.contains("over the limit of 4194304 bytes"),
        "{log}"
    );
    assert!(rss.peak_under(64 * MIB), "{} KiB", rss.max_rss_kib);
    lines.truncate(lines.find("file150000\n").unwrap());
    write(&ctx.join(".dockerignore"), &lines);
    let (out, _) = bounded_build(&root, &ctx, &[]);
    assert!(
        !out.status.success() && text(&out).contains("150000 patterns, over the limit of 100000"),
        "{}",
        text(&out)
    );
    // 5,000 long names 40 directories deep against many-star and `**` patterns.
    let deep = vec!["d".repeat(20); 40].join("/");
    for i in 0..5000 {
        write(
            &ctx.join(&deep).join(format!("{}{i}", "f".repeat(100))),
            "x",
        );
    }
    write(
        &ctx.join(".dockerignore"),
        "**/*a*b*c*d*e*\n**/**/**/x*y*z\n*/*/*/*/**/q*\n**/d*d*d*d*d*d*d*d*/zz\n**/f*f*f*f*f*f*1\n",
    );
    let (out, rss) = bounded_build(
        &root,
        &ctx,
        &[
            "-o",
            &format!("local:{}", t.path().join("deep-out").display()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(rss.peak_under(256 * MIB), "{} KiB", rss.max_rss_kib);
    let kept = fs::read_dir(t.path().join("deep-out/c").join(&deep))
        .unwrap()
        .count();
    // The last pattern leaves out every name ending in 1: 500 of them.
    assert_eq!(kept, 4500);
}

/// An OCI layout at `dir` (tag `t`) of `layers` one-file layers, with `config` (its
/// `rootfs` filled in here).
fn layout(dir: &Path, layers: usize, mut config: serde_json::Value) {
    use sha2::Digest as _;
    use std::io::Write as _;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let (mut descs, mut diff_ids) = (Vec::new(), Vec::new());
    for i in 0..layers {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("f{i}"), &b"x"[..]).unwrap();
        let raw = tar.into_inner().unwrap();
        diff_ids.push(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&raw))
        ));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let (d, n) = put(&gz.finish().unwrap());
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}));
    }
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
    let (cd, cn) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn}, "layers": descs});
    let (md, mn) = put(&serde_json::to_vec(&manifest).unwrap());
    write(&dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
    write(&dir.join("index.json"), &serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": mn, "annotations": {"org.opencontainers.image.ref.name": "t"}}]}).to_string());
}

#[test]
fn bases_with_huge_configs_or_too_many_layers_are_refused_and_no_history_is_fine() {
    let (t, root) = env();
    let build_on = |name: &str, layers: usize, config: serde_json::Value| {
        let dir = t.path().join(name);
        layout(&dir, layers, config);
        let ctx = t.path().join(format!("{name}-ctx"));
        write(
            &ctx.join("Buildfile"),
            &format!("FROM oci:{}:t\nCOPY Buildfile /b\n", dir.display()),
        );
        bounded_build(&root, &ctx, &[])
    };
    let plain = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}});
    // `history` is optional in the image spec.
    let (out, _) = build_on("no-history", 1, plain.clone());
    assert!(out.status.success(), "{}", text(&out));
    // 20 MiB of history.
    let mut big = plain.clone();
    big["history"] = serde_json::json!(vec![
        serde_json::json!({"created_by": "x".repeat(1 << 20)});
        20
    ]);
    let (out, rss) = build_on("big-history", 1, big);
    let log = text(&out);
    assert!(
        !out.status.success()
            && log.contains("config")
            && log.contains("over the limit of 8388608 bytes"),
        "{log}"
    );
    assert!(rss.peak_under(128 * MIB), "{} KiB", rss.max_rss_kib);
    // 10,000 layers.
    let (out, rss) = build_on("many-layers", 10_000, plain);
    let log = text(&out);
    assert!(
        !out.status.success() && log.contains("10000 layers, over the limit of 1000"),
        "{log}"
    );
    assert!(rss.peak_under(256 * MIB), "{} KiB", rss.max_rss_kib);
}

#[test]
fn chown_ids_past_the_last_valid_one_are_errors_not_root() {
    let (t, root) = env();
    for (i, spec) in [
        "4294967295",
        "0:4294967295",
        "99999999999",
        "app:4294967296",
    ]
    .iter()
    .enumerate()
    {
        for op in ["COPY", "ADD"] {
            let ctx = t.path().join(format!("chown-{i}-{op}"));
            write(&ctx.join("f"), "f\n");
            write(
                &ctx.join("Buildfile"),
                &format!("FROM busybox:test\n{op} --chown={spec} f /f\n"),
            );
            let (out, _) = bounded_build(&root, &ctx, &[]);
            let log = text(&out);
            assert!(
                !out.status.success() && log.contains("ids go from 0 to 4294967294"),
                "{spec} {op}: {log}"
            );
        }
    }
    let ctx = t.path().join("chown-max");
    write(&ctx.join("f"), "f\n");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY --chown=4294967294:4294967294 f /f\nRUN stat -c %u:%g /f\n",
    );
    let (out, _) = bounded_build(&root, &ctx, &[]);
    assert!(
        out.status.success() && text(&out).contains("4294967294:4294967294"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_killed_pulls_scratch_is_removed_by_the_next_pull() {
    let (t, root) = env();
    // A pid that is gone: a child that has exited and been reaped.
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let left = root.join("tmp").join(format!("blob-{dead}-123-0"));
    write(&left, &"x".repeat(4096));
    let mine = root
        .join("tmp")
        .join(format!("blob-{}-123-0", std::process::id()));
    write(&mine, "a live process's scratch");
    // Nothing listens there: the pull fails, after cleaning.
    let out = run(builder()
        .args(["pull", "--root"])
        .arg(&root)
        .arg("127.0.0.1:1/none:latest"));
    assert!(!out.status.success());
    assert!(!left.exists(), "{}", text(&out));
    assert!(mine.exists(), "a live owner's scratch is kept");
    drop(t);
}
