//! RUN for another architecture, under QEMU user emulation registered in binfmt_misc: the
//! step runs in the same sandbox and reports the emulated machine. `.ci/run` installs
//! qemu-user-static, registers qemu-aarch64 with the F flag and unpacks Debian's arm64
//! busybox-static into target/test-assets/arm64.

mod common;

use common::*;

#[test]
fn an_arm64_step_runs_under_emulation_in_the_sandbox() {
    let Some(busybox) = arm64_busybox("an_arm64_step_runs_under_emulation_in_the_sandbox") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let base = t.path().join("base");
    std::fs::create_dir_all(base.join("rootfs/bin")).unwrap();
    std::fs::copy(&busybox, base.join("rootfs/bin/busybox")).unwrap();
    for applet in ["sh", "uname", "cat"] {
        std::os::unix::fs::symlink("busybox", base.join("rootfs/bin").join(applet)).unwrap();
    }
    write(&base.join("Buildfile"), "FROM scratch\nCOPY rootfs/ /\n");
    build(
        &root,
        &base,
        &["--platform", "linux/arm64", "-t", "bb-arm64:1"],
    );

    let ctx = t.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM bb-arm64:1\nRUN uname -m > /arch\n",
    );
    let out = t.path().join("out");
    build(
        &root,
        &ctx,
        &[
            "--platform",
            "linux/arm64",
            "-o",
            &format!("local:{}", out.display()),
            "-t",
            "arm:1",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("arch")).unwrap(),
        "aarch64\n"
    );
    let inspect = run_ok(
        builder()
            .args(["inspect", "--root"])
            .arg(&root)
            .arg("arm:1"),
    );
    assert!(inspect.contains("arm64"), "the image says arm64: {inspect}");
}

#[test]
fn one_build_makes_an_index_for_amd64_and_arm64() {
    let Some(busybox) = arm64_busybox("one_build_makes_an_index_for_amd64_and_arm64") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    two_platform_base(&root, t.path(), &busybox);

    // A cross-compile stage runs natively for each target; the final stage is the target's.
    let ctx = t.path().join("app");
    write(
        &ctx.join("Buildfile"),
        "FROM --platform=$BUILDPLATFORM multi-base:1 AS build\nRUN uname -m > /built-on\n\
         FROM multi-base:1\nCOPY --from=build /built-on /built-on\nRUN uname -m > /arch\n",
    );
    let layout = t.path().join("layout");
    let args = [
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &format!("oci:{}:1", layout.display()),
    ];
    let out = run(build_cmd(&root).args(args).arg(&ctx));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let first = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The build stage does not depend on the target: its second instance is a cache hit.
    let build_runs = log
        .lines()
        .filter(|l| l.contains("RUN uname -m > /built-on"))
        .count();
    assert_eq!(build_runs, 2, "{log}");
    assert_eq!(
        log.matches("CACHED").count(),
        1,
        "the two platforms build side by side, and the shared stage runs once: {log}"
    );

    let raw = run_ok(
        tool("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:1", layout.display())),
    );
    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let arches: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(arches, ["amd64", "arm64"]);
    for (arch, machine) in [("arm64", "aarch64"), ("amd64", "x86_64")] {
        let one = t.path().join(format!("one-{arch}"));
        run_ok(
            tool("skopeo")
                .args(["copy", "-q", "--override-arch", arch])
                .arg(format!("oci:{}:1", layout.display()))
                .arg(format!("oci:{}:1", one.display())),
        );
        let rootfs = umoci_unpack(&one, "1", &t.path().join(format!("b-{arch}"))).join("rootfs");
        assert_eq!(
            std::fs::read_to_string(rootfs.join("arch")).unwrap(),
            format!("{machine}\n")
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("built-on")).unwrap(),
            format!("{}\n", std::env::consts::ARCH)
        );
    }

    // A second build hits the cache everywhere and gives the same index.
    let out = run(build_cmd(&root).args(args).arg(&ctx));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first);
    assert_eq!(
        log.matches("CACHED").count(),
        6,
        "every layered step hits: {log}"
    );

    // A docker archive holds one platform.
    let out = run(build_cmd(&root)
        .args(["--platform", "linux/amd64,linux/arm64", "-o"])
        .arg(format!(
            "docker-archive:{}",
            t.path().join("x.tar").display()
        ))
        .arg(&ctx));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("docker-archive output holds one platform")
    );
}
