//! One build file, one digest, everywhere CI runs: as root on the host; rootless with
//! subordinate ranges (newuidmap); in a container with Docker's default profile
//! (`--isolation container`); and in a uid-1000 container with seccomp and AppArmor
//! unconfined (BuildKit's rootless profile, where the sandbox shares the PID namespace).
//! The two containers run builder's own CI image, built by builder from examples/ci.
//!
//! Needs: dockerd (`.ci/run` starts one), the user `builder-rootless` with subordinate
//! ranges (`.ci/run` adds it), busybox-static, uidmap, slirp4netns, libcap2-bin, umoci.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::docker::Docker;
use common::*;

const ROOTLESS_USER: &str = "builder-rootless";
const IMAGE: &str = "builder-ci:environments";

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox-static is not installed: apt-get install busybox-static (or run .ci/run)")
}

/// The test's context, readable by everyone (the rootless user and the containers).
fn context(dir: &Path) -> PathBuf {
    let ctx = dir.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    for f in ["Buildfile", "notes.txt"] {
        fs::copy(testdata(&format!("environments/{}", f)), ctx.join(f)).unwrap();
    }
    fs::copy(busybox(), ctx.join("busybox")).unwrap();
    run_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(dir));
    ctx
}

/// The digest a `builder build` printed last.
fn digest_of(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stderr}");
    let d = stdout.lines().last().unwrap_or("").trim().to_string();
    assert!(
        d.starts_with("sha256:"),
        "{what} printed no digest: {stdout}\n{stderr}"
    );
    d
}

/// builder's CI image from examples/ci/build.sh, loaded into dockerd.
fn ci_image(docker: &Docker, dir: &Path) {
    let archive = dir.join("ci.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ci/build.sh");
    run_ok(
        Command::new(&script)
            .args(["--progress", "plain", "--root"])
            .arg(dir.join("ci-store"))
            .args(["-t", IMAGE, "-o"])
            .arg(format!("docker-archive:{}", archive.display())),
    );
    run_ok(docker.cmd().arg("load").arg("-i").arg(&archive));
}

fn docker_build(
    docker: &Docker,
    ctx: &Path,
    out: &Path,
    run_args: &[&str],
    build_args: &[&str],
) -> std::process::Output {
    run(docker
        .cmd()
        .args(["run", "--rm", "--pull", "never", "--network", "none"])
        .args(run_args)
        .arg("-v")
        .arg(format!("{}:/ctx:ro", ctx.display()))
        .arg("-v")
        .arg(format!("{}:/out", out.display()))
        .arg(IMAGE)
        .args(["build", "--progress", "plain"])
        .args(build_args)
        .arg("/ctx"))
}

fn rootless_ready() {
    let out = run(Command::new("id").arg(ROOTLESS_USER));
    assert!(
        out.status.success(),
        "the user {ROOTLESS_USER} is missing: run .ci/run (it adds the user with subordinate ranges)"
    );
    let subuid = fs::read_to_string("/etc/subuid").unwrap_or_default();
    assert!(
        subuid
            .lines()
            .any(|l| l.starts_with(&format!("{ROOTLESS_USER}:"))),
        "{ROOTLESS_USER} has no range in /etc/subuid: run .ci/run"
    );
    tool("newuidmap");
}

#[test]
fn one_build_file_gives_one_digest_in_every_environment() {
    let docker = Docker::start();
    let t = tempfile::Builder::new()
        .prefix("envs")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let ctx = context(t.path());

    // 1. Root on the host, into an OCI layout the image is checked in.
    let layout = t.path().join("layout");
    let host = run(build_cmd(&t.path().join("root-store"))
        .arg("-o")
        .arg(format!("oci:{}:env", layout.display()))
        .arg("-o")
        .arg(format!("local:{}", t.path().join("out-host").display()))
        .arg(&ctx));
    let root_digest = digest_of(&host, "the root build");

    // 2. Rootless with subordinate ranges.
    rootless_ready();
    let home = t.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let bin = t.path().join("builder");
    fs::copy(env!("CARGO_BIN_EXE_builder"), &bin).unwrap();
    run_ok(Command::new("chown").arg(ROOTLESS_USER).arg(&home));
    let rootless = run(tool("runuser")
        .args(["-u", ROOTLESS_USER, "--", "env"])
        .arg(format!("HOME={}", home.display()))
        .arg(&bin)
        .args([
            "build",
            "--progress",
            "plain",
            "--network",
            "none",
            "--root",
        ])
        .arg(home.join("store"))
        .arg(&ctx));
    let rootless_log = String::from_utf8_lossy(&rootless.stderr).into_owned();
    let rootless_digest = digest_of(&rootless, "the rootless build");
    assert!(
        !rootless_log.contains("only your own uid mapped"),
        "the rootless build mapped its ranges: {rootless_log}"
    );

    // 3 and 4: builder's own image in dockerd.
    ci_image(&docker, t.path());
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o777)).unwrap();
    let contained = docker_build(
        &docker,
        &ctx,
        &out,
        &[],
        &["--isolation", "container", "-o", "local:/out/contained"],
    );
    let contained_digest = digest_of(&contained, "the --isolation container build");
    let relaxed = docker_build(
        &docker,
        &ctx,
        &out,
        &[
            "--user",
            "1000:1000",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
        ],
        &["--network", "none", "-o", "local:/out/relaxed"],
    );
    let relaxed_log = String::from_utf8_lossy(&relaxed.stderr).into_owned();
    let relaxed_digest = digest_of(&relaxed, "the uid-1000 container build");
    assert!(
        relaxed_log.contains("share builder's PID namespace"),
        "the relaxed sandbox is said: {relaxed_log}"
    );
    assert!(
        !relaxed_log.contains("only your own uid mapped"),
        "{relaxed_log}"
    );

    assert_eq!(
        [&rootless_digest, &contained_digest, &relaxed_digest],
        [&root_digest; 3],
        "root, rootless, --isolation container and the uid-1000 container give one digest"
    );

    // Each build's provenance says how its steps were isolated.
    let isolation = |dir: &Path| -> String {
        let p = dir.join("provenance.json");
        let v: serde_json::Value = serde_json::from_slice(
            &fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap();
        v["predicate"]["buildDefinition"]["internalParameters"]["isolation"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(isolation(&t.path().join("out-host")), "sandbox");
    assert_eq!(isolation(&out.join("contained")), "container");
    assert_eq!(isolation(&out.join("relaxed")), "no-process-sandbox");

    // Owners and modes, as the image has them.
    let bundle = umoci_unpack(&layout, "env", t.path());
    let rootfs = bundle.join("rootfs");
    let owner = |p: &str| {
        let md = fs::symlink_metadata(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        (md.uid(), md.gid(), md.mode() & 0o7777)
    };
    assert_eq!(owner("home/app"), (1000, 1000, 0o755));
    assert_eq!(owner("home/app/notes.txt"), (1000, 1000, 0o644));
    assert_eq!(owner("srv/shared"), (0, 50, 0o2775), "a setgid directory");
    assert_eq!(
        owner("srv/shared/from-app"),
        (1000, 50, 0o644),
        "takes its group"
    );
    assert_eq!(
        owner("srv/id.txt"),
        (1000, 50, 0o644),
        "COPY --from --chown by names"
    );
    assert_eq!(owner("var/empty"), (0, 0, 0o755), "made again by root");
    assert!(
        !rootfs.join("bin/ls").exists(),
        "a deleted file stays deleted"
    );
    let id = fs::read_to_string(rootfs.join("home/app/id.txt")).unwrap();
    assert!(
        id.starts_with("uid=1000(app) gid=1000(app)") && id.contains("50(staff)"),
        "{id}"
    );
}

#[test]
fn each_environment_refuses_what_it_cannot_do_and_keeps_builders_own_files() {
    let docker = Docker::start();
    let t = tempfile::Builder::new()
        .prefix("envr")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let ctx = context(t.path());
    ci_image(&docker, t.path());
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();

    // Docker's default profile allows no namespace: the sandbox says what to use instead.
    let sandboxed = docker_build(&docker, &ctx, &out, &[], &[]);
    let log = String::from_utf8_lossy(&sandboxed.stderr);
    assert!(!sandboxed.status.success());
    assert!(
        log.contains("use --isolation container") && log.contains("Buildfile:"),
        "{log}"
    );

    // It writes the container's root: a non-root user is told so before anything runs.
    let unprivileged = docker_build(
        &docker,
        &ctx,
        &out,
        &["--user", "1000:1000"],
        &["--isolation", "container"],
    );
    let log = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(!unprivileged.status.success());
    assert!(log.contains("needs root in the container"), "{log}");

    // --isolation container cannot enforce a network or an entitlement.
    for extra in [&["--network", "none"][..], &["--allow", "network.host"][..]] {
        let mut args = vec!["--isolation", "container"];
        args.extend_from_slice(extra);
        let refused = docker_build(&docker, &ctx, &out, &[], &args);
        let log = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{extra:?} is refused");
        assert!(log.contains("--isolation container"), "{log}");
    }

    // Steps are laid out around builder's own files: credentials under $HOME survive them.
    let script = "mkdir -p $HOME/.docker && echo '{\"auths\":{}}' > $HOME/.docker/config.json \
        && builder build --isolation container --progress plain /ctx \
        && cat $HOME/.docker/config.json";
    let kept = run(docker
        .cmd()
        .args([
            "run",
            "--rm",
            "--pull",
            "never",
            "--network",
            "none",
            "--entrypoint",
            "/bin/sh",
        ])
        .arg("-v")
        .arg(format!("{}:/ctx:ro", ctx.display()))
        .args([IMAGE, "-c", script]));
    assert!(
        kept.status.success(),
        "{}",
        String::from_utf8_lossy(&kept.stderr)
    );
    assert!(String::from_utf8_lossy(&kept.stdout).contains("auths"));

    // On what is not a container, --isolation container never starts.
    let in_a_container = Path::new("/.dockerenv").exists()
        || Path::new("/run/.containerenv").exists()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if !in_a_container {
        let refused = run(build_cmd(&t.path().join("store"))
            .env_remove("container")
            .args(["--isolation", "container"])
            .arg(&ctx));
        let log = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(log.contains("only runs inside a container"), "{log}");
    } else {
        eprintln!("the test itself runs in a container: the host refusal is not checked here");
    }
}

#[test]
fn every_kind_of_mount_gives_the_host_digest_in_a_container() {
    let docker = Docker::start();
    let t = tempfile::Builder::new()
        .prefix("envm")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let ctx = t.path().join("ctx");
    fs::create_dir_all(ctx.join("src")).unwrap();
    fs::copy(
        testdata("environments/mounts/Buildfile"),
        ctx.join("Buildfile"),
    )
    .unwrap();
    fs::copy(
        testdata("environments/mounts/src/a.txt"),
        ctx.join("src/a.txt"),
    )
    .unwrap();
    fs::copy(busybox(), ctx.join("busybox")).unwrap();
    write(&t.path().join("secret.txt"), "s3cret");
    run_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(t.path()));
    let secret = format!("id=tok,src={}", t.path().join("secret.txt").display());
    let host = run(build_cmd(&t.path().join("store"))
        .args(["--secret", &secret])
        .arg(&ctx));
    let host_digest = digest_of(&host, "the root build");
    ci_image(&docker, t.path());
    let contained = run(docker
        .cmd()
        .args(["run", "--rm", "--pull", "never", "--network", "none", "-v"])
        .arg(format!("{}:/e:ro", t.path().display()))
        .args([
            IMAGE,
            "build",
            "--isolation",
            "container",
            "--progress",
            "plain",
        ])
        .args(["--secret", "id=tok,src=/e/secret.txt", "/e/ctx"]));
    assert_eq!(
        digest_of(&contained, "the --isolation container build"),
        host_digest
    );
}
