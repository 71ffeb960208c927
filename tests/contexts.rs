//! `--build-context NAME=VALUE`: a local directory, an image (`docker-image://`) or an OCI
//! layout (`oci-layout://`) in place of what FROM, `COPY --from` and `RUN --mount=from`
//! name, a stage of that name included.

mod common;

use common::*;
use serde_json::Value;

/// The files of a layout's tag, unpacked by umoci.
fn rootfs_of(layout: &std::path::Path, tag: &str, into: &std::path::Path) -> std::path::PathBuf {
    umoci_unpack(layout, tag, into).join("rootfs")
}

#[test]
fn a_local_directory_stands_for_a_stage_an_image_and_a_copy_source() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    let extra = d.path().join("extra");
    write(&ctx.join("main.txt"), "main\n");
    write(&extra.join("e.txt"), "extra\n");
    write(&extra.join("secret/key"), "nope\n");
    // The named context's own .dockerignore applies, not the main one's.
    write(&extra.join(".dockerignore"), "secret\n");
    write(&ctx.join(".dockerignore"), "e.txt\n");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test AS tools\nRUN echo never > /never\n\n\
         FROM scratch AS files\nCOPY main.txt /m\n\n\
         FROM busybox:test\n\
         COPY --from=extra /e.txt /from-copy.txt\n\
         COPY --from=tools /e.txt /from-stage.txt\n\
         RUN --mount=from=extra,target=/mnt cat /mnt/e.txt > /from-mount.txt && ls /mnt > /listed.txt\n\
         COPY --from=files /m /m\n",
    );
    let build_to = |output: String| {
        run_ok(
            build_cmd(&root)
                .args(["--build-context", &format!("extra={}", extra.display())])
                .args(["--build-context", &format!("tools={}", extra.display())])
                .args(["-o", &output])
                .arg(&ctx),
        )
    };
    let layout = d.path().join("layout");
    build_to(format!("oci:{}:t", layout.display()));
    let fs = rootfs_of(&layout, "t", d.path());
    for f in ["from-copy.txt", "from-stage.txt", "from-mount.txt"] {
        assert_eq!(
            std::fs::read_to_string(fs.join(f)).unwrap(),
            "extra\n",
            "{f}"
        );
    }
    // The stage `tools` was replaced, so its RUN never ran; the ignored dir stayed out.
    assert!(!fs.join("never").exists());
    let listed = std::fs::read_to_string(fs.join("listed.txt")).unwrap();
    assert!(!listed.contains("secret"), "{listed}");
    assert_eq!(std::fs::read_to_string(fs.join("m")).unwrap(), "main\n");

    // The provenance records the named context like the main one: its files and root.
    let local = d.path().join("local");
    build_to(format!("local:{}", local.display()));
    let stmt: Value =
        serde_json::from_str(&std::fs::read_to_string(local.join("provenance.json")).unwrap())
            .unwrap();
    let deps = stmt["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    let named = deps
        .iter()
        .find(|d| d["uri"] == "context:extra")
        .unwrap_or_else(|| panic!("no context:extra in {stmt}"));
    let files = named["annotations"]["files"].to_string();
    assert!(
        files.contains("e.txt") && !files.contains("secret"),
        "{files}"
    );
    assert!(named["digest"]["sha256"].is_string(), "{named}");
    assert_eq!(
        stmt["predicate"]["buildDefinition"]["externalParameters"]["buildContexts"]["extra"],
        "local"
    );
}

#[test]
fn a_local_directory_as_a_base_is_its_files_at_the_root() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    let site = d.path().join("site");
    write(&site.join("index.html"), "<h1>hi</h1>\n");
    write(&site.join("css/a.css"), "a{}\n");
    write(&ctx.join("Buildfile"), "FROM site\nCOPY add.txt /\n");
    write(&ctx.join("add.txt"), "add\n");
    let layout = d.path().join("layout");
    let dir = format!("site={}", site.display());
    let first = build(
        &root,
        &ctx,
        &[
            "--build-context",
            &dir,
            "-o",
            &format!("oci:{}:t", layout.display()),
        ],
    );
    let fs = rootfs_of(&layout, "t", d.path());
    assert_eq!(
        std::fs::read_to_string(fs.join("index.html")).unwrap(),
        "<h1>hi</h1>\n"
    );
    assert!(fs.join("css/a.css").is_file() && fs.join("add.txt").is_file());
    // Unchanged directory: the same image. A changed file: another one.
    let again = build(&root, &ctx, &["--build-context", &dir]);
    assert_eq!(first.trim(), again.trim());
    write(&site.join("index.html"), "<h1>changed</h1>\n");
    let changed = build(&root, &ctx, &["--build-context", &dir]);
    assert_ne!(first.trim(), changed.trim());
}

#[test]
fn an_image_or_a_layout_stands_for_a_from_image() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    // Neither image exists anywhere: the named contexts stand for them.
    write(
        &ctx.join("Buildfile"),
        "FROM docker.io/library/alpine:latest\nRUN echo \"from=$(cat /marker 2>/dev/null || echo b)usybox\" > /who\n\
         COPY --from=example.com/tools:1 /tool /tool\n",
    );
    // The layout: an image with a /tool file, tagged in an OCI layout.
    let tools_ctx = d.path().join("tools");
    write(
        &tools_ctx.join("Buildfile"),
        "FROM scratch\nCOPY tool /tool\n",
    );
    write(&tools_ctx.join("tool"), "tool\n");
    let tools = d.path().join("tools-layout");
    build(
        &root,
        &tools_ctx,
        &["-o", &format!("oci:{}:v1", tools.display())],
    );
    let layout = d.path().join("layout");
    run_ok(
        build_cmd(&root)
            .args(["--pull=never"])
            .args(["--build-context", "alpine=docker-image://busybox:test"])
            .args([
                "--build-context",
                &format!("example.com/tools:1=oci-layout://{}:v1", tools.display()),
            ])
            .args(["-o", &format!("oci:{}:t", layout.display())])
            .arg(&ctx),
    );
    let fs = rootfs_of(&layout, "t", d.path());
    assert_eq!(
        std::fs::read_to_string(fs.join("who")).unwrap(),
        "from=busybox\n"
    );
    assert_eq!(std::fs::read_to_string(fs.join("tool")).unwrap(), "tool\n");

    // A layout pinned by digest works as well as by tag.
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(tools.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    write(&ctx.join("Buildfile"), "FROM tools\n");
    run_ok(
        build_cmd(&root)
            .args([
                "--build-context",
                &format!("tools=oci-layout://{}@{}", tools.display(), digest),
            ])
            .arg(&ctx),
    );
}

#[test]
fn an_http_tarball_is_a_build_context() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nCOPY --from=remote app/hello.txt /hello.txt\n",
    );
    // A gzipped tar of app/hello.txt, as a release tarball is.
    let src = d.path().join("src");
    write(&src.join("app/hello.txt"), "from the tarball\n");
    let tarball = d.path().join("ctx.tar.gz");
    run_ok(
        std::process::Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("app"),
    );
    let port = serve(std::fs::read(&tarball).unwrap(), 1);
    let layout = d.path().join("layout");
    run_ok(
        build_cmd(&root)
            .args([
                "--build-context",
                &format!("remote=http://127.0.0.1:{port}/ctx.tar.gz"),
            ])
            .args(["-o", &format!("oci:{}:t", layout.display())])
            .arg(&ctx),
    );
    let rootfs = rootfs_of(&layout, "t", &d.path().join("u"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello.txt")).unwrap(),
        "from the tarball\n"
    );
    // Not an archive: refused, naming the flag.
    let port = serve(b"<html>not a tarball</html>".to_vec(), 1);
    let out = run(build_cmd(&root)
        .args([
            "--build-context",
            &format!("remote=http://127.0.0.1:{port}/x"),
        ])
        .arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--build-context") && err.contains("tar archive"),
        "{err}"
    );
}

#[test]
fn a_bad_build_context_is_refused_with_its_value() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let ctx = d.path().join("ctx");
    write(&ctx.join("Buildfile"), "FROM scratch\n");
    for (value, says) in [
        ("novalue", "NAME=VALUE"),
        ("x=/does/not/exist", "/does/not/exist"),
        ("x=oci-layout:///does/not/exist", "/does/not/exist"),
        ("x=ftp://host/x", "docker-image://"),
        ("x=docker-image://UPPER/Case", "UPPER"),
    ] {
        let out = run(build_cmd(&root).args(["--build-context", value]).arg(&ctx));
        assert!(!out.status.success(), "{value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--build-context") && err.contains(says),
            "{value}: {err}"
        );
    }
}
