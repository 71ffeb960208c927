//! Rootless builds: run as an unprivileged user, builder enters its own user namespace (only
//! its uid mapped, to 0) and builds with RUN exactly as root does; for a base owned by root
//! the image is byte-identical to a root build. A USER with another id fails clearly.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

const NOBODY: &str = "65534";

fn as_nobody(bin: &Path, home: &Path, args: &[&str]) -> std::process::Output {
    run(tool("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "env",
            "-u",
            "SOURCE_DATE_EPOCH",
        ])
        .arg(format!("HOME={}", home.display()))
        .arg(bin)
        .args(args))
}

#[test]
fn rootless_build_with_run_matches_the_root_build() {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // A root-owned busybox root filesystem and a context, readable by everyone.
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static is not installed");
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::copy(bb, rootfs.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo", "id", "rm", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    let ctx = t.path().join("ctx");
    write(&ctx.join("file.txt"), "data\n");
    write(&ctx.join("Buildfile"), "FROM base:1\nCOPY file.txt /srv/file.txt\nRUN --network=none echo \"uid $(id -u)\" > /srv/made && rm /bin/ls\nRUN --network=none cat /srv/made\n");
    // The binary and a store the unprivileged user owns.
    let bin = t.path().join("builder");
    fs::copy(env!("CARGO_BIN_EXE_builder"), &bin).unwrap();
    let home = t.path().join("home");
    fs::create_dir_all(&home).unwrap();
    nix::unistd::chown(&home, Some(65534.into()), Some(65534.into())).unwrap();
    let store = home.join("store");
    let s = store.display().to_string();
    let ctx_arg = ctx.display().to_string();
    let build_as_nobody = || {
        as_nobody(
            &bin,
            &home,
            &[
                "build",
                "--progress",
                "plain",
                "--root",
                &s,
                "--metadata-file",
                &format!("{}/meta.json", s),
                &ctx_arg,
            ],
        )
    };
    let out = as_nobody(
        &bin,
        &home,
        &[
            "import",
            "--root",
            &s,
            &rootfs.display().to_string(),
            "-t",
            "base:1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = build_as_nobody();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("rootless mode") && log.contains("uid 0"),
        "{log}"
    );
    let rootless_digest = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let root_store = t.path().join("root-store");
    run_ok(
        builder()
            .args(["import", "--root"])
            .arg(&root_store)
            .arg(&rootfs)
            .args(["-t", "base:1"]),
    );
    let root_meta = t.path().join("root-meta.json");
    let root_digest = build(
        &root_store,
        &ctx,
        &["--metadata-file", root_meta.to_str().unwrap()],
    );
    assert_eq!(
        rootless_digest, root_digest,
        "a rootless build gives the same image as a root build"
    );
    let attested = |p: &std::path::Path| -> String {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        v["attestations.index.digest"].as_str().unwrap().to_string()
    };
    assert_eq!(
        attested(&std::path::Path::new(&s).join("meta.json")),
        attested(&root_meta),
        "and the same attestations"
    );
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&s),
        "no mount is left behind"
    );

    // A USER whose id is not mapped cannot run, and says why.
    write(
        &ctx.join("Buildfile"),
        "FROM base:1\nUSER 1000\nRUN --network=none id\n",
    );
    let out = build_as_nobody();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not available in rootless mode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
