//! More of `docker buildx build`'s command line: `--call targets|outline|check` (nothing is
//! built), `-q`, and `--annotation` at the manifest, index and descriptor levels.

mod common;

use common::*;
use serde_json::Value;

const DOCUMENTED: &str = "# GO_VERSION sets the Go version\nARG GO_VERSION=1.22\n\n# build compiles the app\nFROM scratch AS build\nARG FLAVOR=plain\nCOPY a /a\n\nFROM scratch AS unused\nARG NEVER=1\n\n# release is what ships\nFROM scratch AS release\nCOPY --from=build /a /a\n";

#[test]
fn call_targets_and_outline_describe_the_file_without_building() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(&ctx.join("Buildfile"), DOCUMENTED);
    write(&ctx.join("a"), "a\n");
    let targets = run_ok(build_cmd(&root).args(["--call", "targets"]).arg(&ctx));
    assert!(
        targets
            .lines()
            .any(|l| l.starts_with("build ") && l.ends_with(" compiles the app")),
        "the description is the comment after the stage's name: {targets}"
    );
    assert!(targets.contains("release (default)"), "{targets}");
    let json: Value = serde_json::from_str(&run_ok(
        build_cmd(&root)
            .args(["--call", "outline", "--format", "json"])
            .arg(&ctx),
    ))
    .unwrap();
    assert_eq!(json["name"], "release");
    let args: Vec<&str> = json["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["FLAVOR"],
        "only what the target's stages declare: {json}"
    );
    let outline = run_ok(
        build_cmd(&root)
            .args(["--call", "outline", "--target", "build"])
            .arg(&ctx),
    );
    assert!(outline.contains("TARGET:      build"), "{outline}");
    // Nothing was built: the store holds no image.
    let images = run_ok(builder().args(["images", "--root"]).arg(&root));
    assert!(!images.contains("sha256:"), "{images}");
    let bad = run(build_cmd(&root).args(["--call", "lint"]).arg(&ctx));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("build, check, outline or targets"));
    let check = run_ok(build_cmd(&root).args(["--call", "check"]).arg(&ctx));
    assert!(check.contains("no warnings"), "{check}");
}

#[test]
fn quiet_prints_the_digest_alone_and_annotations_land_where_asked() {
    // The levels, as buildx: manifest (the default), index, manifest-descriptor,
    // index-descriptor (the layout's index.json entry).
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY a /a-$TARGETARCH\n",
    );
    write(&ctx.join("a"), "a\n");
    let layout = d.path().join("layout");
    let out = run(builder()
        .args(["build", "-q", "--root"])
        .arg(&root)
        .args(["--platform", "linux/amd64,linux/arm64"])
        .args(["--annotation", "org.opencontainers.image.title=app"])
        .args(["--annotation", "index:org.opencontainers.image.vendor=us"])
        .args(["--annotation", "manifest-descriptor[linux/arm64]:only=arm"])
        .args(["--annotation", "index-descriptor:org.example.release=1.2"])
        .args(["-o", &format!("oci:{}:t", layout.display())])
        .arg(&ctx));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // index-descriptor: the layout's own entry for what the build made, beside its tag.
    let layout_index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = layout_index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["digest"].as_str() == Some(stdout.trim()))
        .unwrap_or_else(|| panic!("{layout_index}"));
    assert_eq!(
        entry["annotations"]["org.example.release"], "1.2",
        "{entry}"
    );
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "t"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("sha256:"));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("DONE"),
        "no progress with -q"
    );
    let index: Value = serde_json::from_str(&run_ok(
        tool("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:t", layout.display())),
    ))
    .unwrap();
    assert_eq!(
        index["annotations"]["org.opencontainers.image.vendor"],
        "us"
    );
    for m in index["manifests"].as_array().unwrap() {
        let arch = m["platform"]["architecture"].as_str().unwrap();
        assert_eq!(
            m["annotations"]["only"].as_str(),
            (arch == "arm64").then_some("arm"),
            "{index}"
        );
        let hex = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.title"], "app",
            "every platform's manifest"
        );
    }
    // The same flags give the same digest (annotations are part of the reproducible image).
    let again = run_ok(
        builder()
            .args(["build", "-q", "--root"])
            .arg(d.path().join("other-root"))
            .args(["--platform", "linux/amd64,linux/arm64"])
            .args(["--annotation", "org.opencontainers.image.title=app"])
            .args(["--annotation", "index:org.opencontainers.image.vendor=us"])
            .args(["--annotation", "manifest-descriptor[linux/arm64]:only=arm"])
            .arg(&ctx),
    );
    assert_eq!(again.trim(), stdout.trim());
    let bad = run(build_cmd(&root)
        .args(["--annotation", "nokeyvalue"])
        .arg(&ctx));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("want KEY=VALUE"));
}

/// The manifest and config of a layout's tag.
fn manifest_and_config(layout: &std::path::Path, tag: &str) -> (Value, Value) {
    let blob = |d: &str| -> Value {
        let hex = d.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index = blob_index(layout);
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag}: {index}"));
    let manifest = blob(m["digest"].as_str().unwrap());
    let config = blob(manifest["config"]["digest"].as_str().unwrap());
    (manifest, config)
}

fn blob_index(layout: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap()
}

#[test]
fn squash_makes_the_target_stages_layers_one_and_keeps_what_they_did() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test AS base\n\
         RUN mkdir -p /app/tmp && echo one > /app/a && echo t > /app/tmp/x\n\
         FROM base\n\
         RUN echo two > /app/a && rm -rf /app/tmp && rm /bin/ls\n\
         COPY f /app/f\n\
         RUN ln /app/f /app/hard && chmod 600 /app/a\n\
         CMD [\"cat\", \"/app/a\"]\n",
    );
    write(&ctx.join("f"), "from the context\n");
    let layout = d.path().join("layout");
    let build = |root: &std::path::Path, extra: &[&str], tag: &str| {
        run_ok(
            build_cmd(root)
                .args(extra)
                .args(["-o", &format!("oci:{}:{}", layout.display(), tag)])
                .arg(&ctx),
        )
    };
    build(&root, &[], "plain");
    let squashed_digest = build(&root, &["--squash"], "squashed");
    assert!(
        squashed_digest.trim().starts_with("sha256:"),
        "{squashed_digest}"
    );
    let (plain, _) = manifest_and_config(&layout, "plain");
    let (manifest, config) = manifest_and_config(&layout, "squashed");
    let layers = |m: &Value| m["layers"].as_array().unwrap().clone();
    assert_eq!(
        layers(&plain).len(),
        5,
        "busybox, the base stage's RUN, three more"
    );
    assert_eq!(
        layers(&manifest)[..2],
        layers(&plain)[..2],
        "the base's layers stay as they are"
    );
    assert_eq!(
        layers(&manifest).len(),
        3,
        "the target stage's three became one"
    );
    let history = config["history"].as_array().unwrap();
    let made_layers = history.iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(made_layers, 3, "one history entry per layer: {history:?}");
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);

    // The files are what the steps left, as another tool unpacks them.
    let rootfs = umoci_unpack(&layout, "squashed", &d.path().join("u")).join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/a")).unwrap(),
        "two\n"
    );
    assert!(!rootfs.join("app/tmp").exists(), "deleted below the base");
    assert!(
        !rootfs.join("bin/ls").exists(),
        "deleted from the base image"
    );
    assert!(rootfs.join("bin/cat").exists());
    use std::os::unix::fs::MetadataExt;
    let (f, hard) = (
        std::fs::metadata(rootfs.join("app/f")).unwrap(),
        std::fs::metadata(rootfs.join("app/hard")).unwrap(),
    );
    assert_eq!(f.ino(), hard.ino(), "the hard link stays one");
    assert_eq!(
        std::fs::metadata(rootfs.join("app/a")).unwrap().mode() & 0o777,
        0o600
    );

    // Reproducible: another store, the same image.
    let other = d.path().join("other-root");
    busybox_base(&other, "busybox:test");
    assert_eq!(
        build(&other, &["--squash"], "again").trim(),
        squashed_digest.trim()
    );
}

#[test]
fn ulimit_and_shm_size_reach_every_run_step_and_its_key() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\n\
         RUN ulimit -Sn > /soft && ulimit -Hn > /hard && /bin/busybox df -k /dev/shm | /bin/busybox tail -1 > /shm\n",
    );
    let out = d.path().join("out");
    let build_with = |extra: &[&str]| {
        run_ok(
            build_cmd(&root)
                .args(extra)
                .args(["-o", &format!("local:{}", out.display())])
                .arg(&ctx),
        )
    };
    build_with(&["--ulimit", "nofile=1024:2048", "--shm-size", "128m"]);
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    assert_eq!(read("soft").trim(), "1024");
    assert_eq!(read("hard").trim(), "2048");
    // 128 MiB of tmpfs: 131072 1K-blocks.
    let shm: Vec<String> = read("shm").split_whitespace().map(String::from).collect();
    assert_eq!(shm[1], "131072", "{shm:?}");
    // Other limits are another step: it runs again.
    build_with(&["--ulimit", "nofile=512"]);
    assert_eq!(read("soft").trim(), "512");
    assert_eq!(read("hard").trim(), "512");
    let shm: Vec<String> = read("shm").split_whitespace().map(String::from).collect();
    assert_eq!(shm[1], "65536", "docker's default of 64 MiB: {shm:?}");

    for (flag, value, says) in [
        ("--ulimit", "nofiles=1", "unknown limit"),
        ("--ulimit", "nofile=9:3", "soft limit is above"),
        ("--ulimit", "nofile", "NAME=SOFT"),
        ("--shm-size", "12q", "unit"),
    ] {
        let bad = run(build_cmd(&root).args([flag, value]).arg(&ctx));
        assert!(!bad.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
}

#[test]
fn build_help_groups_its_flags_and_readme_lists_every_one() {
    let help = run_ok(builder().args(["build", "--help"]));
    let headings: Vec<&str> = help
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':'))
        .collect();
    for h in [
        "Build file and context:",
        "Build arguments and target:",
        "Outputs:",
        "RUN steps:",
        "Cache:",
        "Attestations and signing:",
        "Progress and debugging:",
    ] {
        assert!(headings.contains(&h), "{h} missing from {headings:?}");
    }
    // Every flag --help shows is in README's usage block.
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let usage = readme
        .split("builder build [OPTIONS] [CONTEXT]")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README's usage block");
    let flags = help
        .lines()
        .filter(|l| l.starts_with("  -") || l.starts_with("      --"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")));
    for flag in flags {
        let flag = flag.split(['=', '[', '<']).next().unwrap();
        if flag == "--help" || flag.len() < 3 {
            continue;
        }
        assert!(
            usage.contains(&format!("{flag} "))
                || usage.contains(&format!("{flag},"))
                || usage.contains(&format!("{flag}\n"))
                || usage.contains(&format!("{flag}["))
                || usage.contains(&format!("{flag}=")),
            "{flag} is not in README's usage block"
        );
    }
}

#[test]
fn load_puts_the_image_into_the_docker_daemon_under_its_names() {
    let docker = common::docker::Docker::start();
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nRUN echo \"lo$(echo ad)ed\" > /l\nCMD [\"cat\", \"/l\"]\n",
    );
    let tag = format!("builder-load-test:{}", std::process::id());
    run_ok(
        build_cmd(&root)
            .env("DOCKER_HOST", &docker.host)
            .args(["--load", "-t", &tag])
            .arg(&ctx),
    );
    let out =
        run_ok(
            docker
                .cmd()
                .args(["run", "--rm", "--pull", "never", "--network", "none", &tag]),
        );
    assert_eq!(out, "loaded\n");
    // The image docker holds is the one builder made: the same config.
    let id = run_ok(
        docker
            .cmd()
            .args(["image", "inspect", "-f", "{{.Id}}", &tag]),
    );
    let ours = run_ok(builder().args(["inspect", "--root"]).arg(&root).arg(&tag));
    let inspected: Value = serde_json::from_str(&ours).unwrap();
    assert_eq!(
        id.trim(),
        inspected["manifest"]["config"]["digest"].as_str().unwrap()
    );
    let _ = docker.cmd().args(["rmi", "-f", &tag]).output();

    // A daemon builder cannot reach is named.
    let bad = run(build_cmd(&root)
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .args(["--load"])
        .arg(&ctx));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--load") && err.contains("/nonexistent/docker.sock"),
        "{err}"
    );
}
