//! RUN end to end on a busybox base made with `builder import`: what a step changes comes out
//! right, the host is invisible, docker's USER/WORKDIR/ENV/ARG/SHELL/exec semantics hold,
//! failures are reported, secrets never persist, both snapshotters agree, and killing a build
//! leaves no mount or process behind.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: busybox_dir() }
    }
    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
    fn ctx(&self, buildfile: &str) -> std::path::PathBuf {
        let ctx = self.dir.path().join(format!(
            "ctx-{}",
            fs::read_dir(self.dir.path()).unwrap().count()
        ));
        write(&ctx.join("Buildfile"), buildfile);
        ctx
    }
    fn build_local(&self, buildfile: &str, extra: &[&str]) -> (String, std::path::PathBuf) {
        let ctx = self.ctx(buildfile);
        let layout = self.dir.path().join(format!(
            "layout-{}",
            fs::read_dir(self.dir.path()).unwrap().count()
        ));
        let mut args = vec!["--progress", "plain", "-o"];
        let o = format!("oci:{}:t", layout.display());
        args.push(&o);
        args.extend_from_slice(extra);
        let d = build(&self.root(), &ctx, &args);
        assert!(d.starts_with("sha256:"));
        (d, layout)
    }
    fn stdout_of(&self, buildfile: &str) -> String {
        self.log_of(buildfile, &[])
    }
    fn log_of(&self, buildfile: &str, extra: &[&str]) -> String {
        let ctx = self.ctx(buildfile);
        let out = run(builder()
            .args(["build", "--progress", "plain", "--root"])
            .arg(self.root())
            .args(extra)
            .arg(&ctx));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    }
}

/// Lines a step printed (`#N text` lines that are not step headers or timings).
fn step_output(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter_map(|l| l.split_once(' ').map(|(_, t)| t.to_string()))
        .filter(|t| !t.starts_with('[') && !t.starts_with("DONE") && !t.starts_with("CACHED"))
        .collect()
}

fn no_mounts_under(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    !info.contains(&path.display().to_string())
}

#[test]
fn created_changed_deleted_files_and_dirs_unpack_right() {
    let e = Env::new();
    let (_, layout) = e.build_local(
        "FROM busybox:test\n\
         RUN mkdir -p /keep /gone/deep /opaque && echo old > /keep/changed && echo x > /gone/deep/f && echo lower > /opaque/lower\n\
         RUN echo new > /keep/changed && echo added > /keep/added && rm -rf /gone && rm /bin/wc && rm -rf /opaque && mkdir /opaque && echo upper > /opaque/upper && chmod 0700 /keep\n",
        &[],
    );
    let t = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "t", t.path()).join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("keep/changed")).unwrap(),
        "new\n"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("keep/added")).unwrap(),
        "added\n"
    );
    assert_eq!(
        fs::metadata(rootfs.join("keep")).unwrap().mode() & 0o7777,
        0o700
    );
    assert!(
        !rootfs.join("gone").exists(),
        "a whole directory from a lower layer is deleted"
    );
    assert!(
        !rootfs.join("bin/wc").exists(),
        "a file from the base layer is deleted"
    );
    assert!(rootfs.join("bin/cat").exists());
    assert!(
        !rootfs.join("opaque/lower").exists(),
        "a recreated directory hides the lower contents"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("opaque/upper")).unwrap(),
        "upper\n"
    );
    // As BuildKit (v0.11 and later) removes its mount stubs: neither the directories the
    // sandbox mounts on nor the files it provides in /etc are in the image.
    for p in [
        "proc",
        "dev",
        "sys",
        "etc/resolv.conf",
        "etc/hostname",
        "etc/hosts",
    ] {
        assert!(
            !rootfs.join(p).exists(),
            "{p} is provided by the sandbox, never part of the image"
        );
    }
}

#[test]
fn host_filesystem_processes_and_network_are_invisible() {
    let e = Env::new();
    let marker = e.dir.path().join("host-marker");
    fs::write(&marker, "secret host file").unwrap();
    let log = e.stdout_of(&format!(
        "FROM busybox:test\n\
         RUN test ! -e {m} && echo no-host-file; ls /proc | grep -c '^[0-9]' ; echo hostname=$(cat /etc/hostname); echo > /host-write-test\n\
         RUN --network=none ls /sys/class/net\n",
        m = marker.display()
    ));
    let out = step_output(&log);
    assert!(out.contains(&"no-host-file".to_string()), "{log}");
    let pids: usize = out.iter().find_map(|l| l.parse().ok()).expect("pid count");
    assert!(
        pids <= 4,
        "only the step's own processes are visible, saw {pids}"
    );
    assert!(out.contains(&"hostname=builder".to_string()));
    assert!(
        out.contains(&"lo".to_string())
            && !out
                .iter()
                .any(|l| l.starts_with("eth") || l.starts_with("ens")),
        "{log}"
    );
    assert!(
        !Path::new("/host-write-test").exists(),
        "a step cannot write to the host's /"
    );
}

#[test]
fn user_workdir_env_arg_shell_and_exec_form_behave_like_docker() {
    let e = Env::new();
    let log = e.stdout_of(
        "FROM busybox:test\n\
         ARG BUILD_ONLY=from-arg\n\
         ENV FROM_ENV=env-value\n\
         ARG FROM_ENV=arg-loses\n\
         RUN echo \"arg=$BUILD_ONLY env=$FROM_ENV\"\n\
         USER app\n\
         WORKDIR /home/app/w\n\
         RUN echo \"uid=$(id -u) groups=$(id -G) pwd=$(pwd) home=$HOME\"\n\
         RUN [\"/bin/echo\", \"exec\", \"$FROM_ENV\"]\n\
         SHELL [\"/bin/sh\", \"-c\", \"echo shell-prefix; eval \\\"$0\\\"\"]\n\
         RUN echo via-custom-shell\n",
    );
    let out = step_output(&log);
    assert!(
        out.contains(&"arg=from-arg env=env-value".to_string()),
        "ENV wins over ARG of the same name: {log}"
    );
    assert!(
        out.contains(&"uid=1000 groups=1000 50 pwd=/home/app/w home=/home/app".to_string()),
        "{log}"
    );
    assert!(
        out.contains(&"exec $FROM_ENV".to_string()),
        "exec form is not expanded: {log}"
    );
    assert!(
        out.contains(&"shell-prefix".to_string()) && out.contains(&"via-custom-shell".to_string()),
        "{log}"
    );

    // ARGs do not persist into the image config; ENV does.
    let (_, layout) = e.build_local(
        "FROM busybox:test\nARG SECRETISH=1\nENV KEPT=1\nRUN true\n",
        &[],
    );
    let inspect = run_ok(
        tool("skopeo")
            .arg("inspect")
            .arg("--config")
            .arg(format!("oci:{}:t", layout.display())),
    );
    let config: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "KEPT=1"
        ]),
        "{inspect}"
    );
}

#[test]
fn heredoc_scripts_run_with_their_shebang() {
    let e = Env::new();
    let log = e.stdout_of("FROM busybox:test\nRUN <<EOF\n#!/bin/sh -e\necho \"script as $0\"\nEOF\nRUN cat <<A\nfrom stdin heredoc\nA\n");
    let out = step_output(&log);
    assert!(out.iter().any(|l| l.starts_with("script as ")), "{log}");
    assert!(out.contains(&"from stdin heredoc".to_string()), "{log}");
}

#[test]
fn failing_step_reports_step_exit_code_output_and_line() {
    let e = Env::new();
    let ctx = e.ctx("FROM busybox:test\nRUN true\nRUN echo compiling; echo 'error: it broke' >&2; exit 2\nRUN echo never\n");
    let out = run(builder().args(["build", "--root"]).arg(e.root()).arg(&ctx));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Buildfile:3:1: step 3/4 RUN echo compiling; echo 'error: it broke' >&2; exit 2: exit code 2"), "{err}");
    assert!(
        err.contains("> error: it broke"),
        "the last output lines are shown: {err}"
    );
    assert!(!err.contains("never"));
    assert!(no_mounts_under(&e.root()));
}

#[test]
fn secrets_reach_the_step_but_never_the_image_or_store() {
    let e = Env::new();
    let secret_file = e.dir.path().join("token");
    let secret = "s3cr3t-value-never-stored";
    fs::write(&secret_file, secret).unwrap();
    let ctx = e.ctx("FROM busybox:test\nRUN --mount=type=secret,id=token cat /run/secrets/token > /dev/null && echo saw-$(cat /run/secrets/token | wc -c)\nRUN --mount=type=secret,id=token,env=TOKEN test ${#TOKEN} -eq 25 && echo env-ok\n");
    let layout = e.dir.path().join("secret-layout");
    let out = run_ok(
        builder()
            .args(["build", "--progress", "quiet", "--root"])
            .arg(e.root())
            .arg("--secret")
            .arg(format!("id=token,src={}", secret_file.display()))
            .arg("-o")
            .arg(format!("oci:{}:t", layout.display()))
            .arg(&ctx)
            .stderr(Stdio::piped()),
    );
    assert!(out.starts_with("sha256:"));
    for dir in [e.root(), layout.clone()] {
        for f in walkdir::WalkDir::new(&dir)
            .into_iter()
            .flatten()
            .filter(|f| f.file_type().is_file())
        {
            let bytes = fs::read(f.path()).unwrap();
            let mut text = bytes.clone();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                use std::io::Read;
                text.clear();
                let _ = flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut text);
            }
            assert!(
                !String::from_utf8_lossy(&text).contains(secret),
                "secret found in {}",
                f.path().display()
            );
        }
    }
    let t = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "t", t.path()).join("rootfs");
    // Neither the secret nor the directories made for its mount point stay, as BuildKit
    // (v0.11 and later) removes mount stubs.
    assert!(!rootfs.join("run").exists());
}

#[test]
fn cache_mounts_persist_between_builds() {
    let e = Env::new();
    let file = "FROM busybox:test\nRUN --mount=type=cache,target=/cache echo run >> /cache/log && wc -l < /cache/log\n";
    let first = step_output(&e.stdout_of(file));
    let second = step_output(&e.log_of(file, &["--no-cache"]));
    assert!(first.contains(&"1".to_string()), "{first:?}");
    assert!(second.contains(&"2".to_string()), "{second:?}");
    let (_, layout) = e.build_local(file, &[]);
    let t = tempfile::tempdir().unwrap();
    assert!(
        !umoci_unpack(&layout, "t", t.path())
            .join("rootfs/cache/log")
            .exists(),
        "cache content is not in the image"
    );
}

#[test]
fn overlay_and_copy_snapshotters_write_identical_layers() {
    let e = Env::new();
    let file = "FROM busybox:test\nRUN mkdir -p /a/b && echo 1 > /a/b/c && echo 2 > /top && rm /bin/wc && ln -s /top /a/link\nRUN rm -rf /a/b && echo 3 >> /top && chmod 600 /top\n";
    let ctx = e.ctx(file);
    // --no-cache: the snapshotter is not part of a step's key, so the second build would
    // otherwise hit the first one's entries and compare nothing.
    let build_with = |snapshotter: &str| {
        run_ok(
            builder()
                .env("BUILDER_SNAPSHOTTER", snapshotter)
                .args(["build", "--progress", "quiet", "--no-cache"])
                .args(["--source-date-epoch", "0", "--root"])
                .arg(e.root())
                .arg(&ctx),
        )
    };
    let overlay = build_with("overlay");
    let copy = build_with("copy");
    assert_eq!(
        overlay, copy,
        "both snapshotters produce byte-identical layers and the same image"
    );
}

fn kill_mid_step(signal: &str, seconds: u32) {
    let e = Env::new();
    // A sleep length unique to this test: tests run concurrently and must not see each other's steps.
    let ctx = e.ctx(&format!(
        "FROM busybox:test\nRUN echo started && sleep {seconds}\n"
    ));
    let mut child = builder()
        .args(["build", "--progress", "plain", "--root"])
        .arg(e.root())
        .arg(&ctx)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the step runs.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("started") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the step started");
    run_ok(std::process::Command::new("kill").args([signal, &child.id().to_string()]));
    let _ = child.wait();
    // Every process of the step dies with it and no mount stays behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pattern = format!("sleep {seconds}$");
        let sleeping = run(std::process::Command::new("pgrep").args(["-f", &pattern]))
            .status
            .success();
        if !sleeping && no_mounts_under(&e.root()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "step processes or mounts remain after kill {signal}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run_ok(builder().args(["fsck", "--root"]).arg(e.root()));
    let ctx2 = e.ctx("FROM busybox:test\nRUN echo next build works\n");
    build(&e.root(), &ctx2, &[]);
}

#[test]
fn sigint_mid_step_leaves_nothing_behind() {
    kill_mid_step("-INT", 301);
}

#[test]
fn sigkill_mid_step_leaves_nothing_behind() {
    kill_mid_step("-KILL", 302);
}

#[test]
fn bind_and_tmpfs_mounts_are_visible_to_the_step_but_their_contents_not_in_the_layer() {
    let e = Env::new();
    let ctx = e.ctx("FROM busybox:test AS src\nRUN echo from-stage > /made\nFROM busybox:test\nRUN --mount=type=bind,source=data,target=/in cat /in/input.txt > /copied && ! touch /in/new 2>/dev/null\nRUN --mount=type=bind,from=src,source=/made,target=/from-stage cat /from-stage >> /copied\nRUN --mount=type=tmpfs,target=/scratch echo tmp > /scratch/x && cat /scratch/x >> /copied\n");
    write(&ctx.join("data/input.txt"), "from-context\n");
    let layout = e.dir.path().join("bind-layout");
    build(
        &e.root(),
        &ctx,
        &["-o", &format!("oci:{}:t", layout.display())],
    );
    let t = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "t", t.path()).join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("copied")).unwrap(),
        "from-context\nfrom-stage\ntmp\n",
        "a read-only bind (context and stage) and a tmpfs"
    );
    // No mount point the step's mounts needed stays, as BuildKit (v0.11 and later) removes
    // mount stubs; nor the sandbox's own (/proc, /dev, /sys), which the base lacks.
    for p in ["in", "scratch", "from-stage", "proc", "dev", "sys"] {
        assert!(!rootfs.join(p).exists(), "mount point /{p} stayed");
    }
}

#[test]
fn a_step_for_another_platform_never_hits_the_native_cache_nor_runs_unemulated() {
    let e = Env::new();
    let file = "FROM busybox:test\nRUN echo step > /step\n";
    let ctx = e.ctx(file);
    build(&e.root(), &ctx, &["--progress", "plain"]);
    // s390x: a platform whose steps need QEMU here.
    let out = run(build_cmd(&e.root())
        .args(["--platform", "linux/s390x"])
        .arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("CACHED"),
        "a step of another platform reuses no native entry: {err}"
    );
    if !out.status.success() {
        assert!(
            err.contains("QEMU") && err.contains("binfmt_misc") && err.contains("Buildfile:2:1"),
            "without an emulator the step is refused with how to register one: {err}"
        );
    }
}

#[test]
fn from_platform_builds_that_stage_for_its_platform() {
    let e = Env::new();
    // The cross-compile pattern: the build stage runs natively whatever the target; the
    // final stage is the target's.
    let ctx = e.ctx(
        "FROM --platform=$BUILDPLATFORM busybox:test AS build\nARG TARGETARCH\nRUN uname -m > /built-on && echo $TARGETARCH > /built-for\nFROM scratch\nCOPY --from=build /built-on /built-for /\n",
    );
    let layout = e.dir.path().join("cross");
    build(
        &e.root(),
        &ctx,
        &[
            "--platform",
            "linux/s390x",
            "-o",
            &format!("oci:{}:t", layout.display()),
        ],
    );
    let t = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "t", t.path()).join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("built-on")).unwrap(),
        format!("{}\n", std::env::consts::ARCH)
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("built-for")).unwrap(),
        "s390x\n"
    );
    let config = run_ok(
        tool("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:t", layout.display())),
    );
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["architecture"], "s390x", "the image is the target's");

    // A stage of another platform than the build's says so in its config.
    let ctx = e.ctx("FROM --platform=linux/arm64 scratch\nCOPY Buildfile /\n");
    let layout = e.dir.path().join("arm");
    build(
        &e.root(),
        &ctx,
        &["-o", &format!("oci:{}:t", layout.display())],
    );
    let config = run_ok(
        tool("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:t", layout.display())),
    );
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["architecture"], "arm64");
}

#[test]
fn add_host_reaches_every_step_and_label_the_image() {
    let e = Env::new();
    let file = "FROM busybox:test\nRUN cat /etc/hosts\n";
    let hosts = ["--add-host", "db:10.1.2.3", "--add-host", "v6=fd00::7"];
    let log = e.log_of(file, &hosts);
    let out = step_output(&log);
    assert!(out.contains(&"10.1.2.3\tdb".to_string()), "{out:?}");
    assert!(out.contains(&"fd00::7\tv6".to_string()), "{out:?}");
    // The hosts are part of the step: without them it runs again, and they are gone.
    let log = e.log_of(file, &[]);
    assert!(!log.contains("10.1.2.3"), "{log}");
    let out = run(builder()
        .args(["build", "--add-host", "db:nowhere", "--root"])
        .arg(e.root())
        .arg(e.ctx(file)));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an IP address"));

    // Labels land in the image's config, after the build file's own.
    let (_, layout) = e.build_local(
        "FROM busybox:test\nLABEL team=core keep=1\n",
        &[
            "--label",
            "team=platform",
            "--label",
            "org.opencontainers.image.revision=abc",
        ],
    );
    let t = tempfile::tempdir().unwrap();
    let bundle = umoci_unpack(&layout, "t", t.path());
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let labels = &config["annotations"];
    assert_eq!(labels["team"], "platform", "{config}");
    assert_eq!(labels["keep"], "1");
    assert_eq!(labels["org.opencontainers.image.revision"], "abc");
}
