//! RUN for another architecture, under QEMU user emulation registered in binfmt_misc: the
//! step runs in the same sandbox and reports the emulated machine. `.ci/run` installs
//! qemu-user-static, registers qemu-aarch64 with the F flag and unpacks Debian's arm64
//! busybox-static into target/test-assets/arm64.

mod common;

use common::*;
use std::path::Path;

#[test]
fn an_arm64_step_runs_under_emulation_in_the_sandbox() {
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc");
    if !binfmt.join("register").exists() {
        eprintln!(
            "\n*** SKIPPED an_arm64_step_runs_under_emulation_in_the_sandbox: the kernel has no \
             binfmt_misc mounted at {} (mount -t binfmt_misc binfmt_misc {}) ***\n",
            binfmt.display(),
            binfmt.display()
        );
        return;
    }
    assert!(
        binfmt.join("qemu-aarch64").exists(),
        "no qemu-aarch64 handler in binfmt_misc: run .ci/run (it installs qemu-user-static and \
         registers it with the F flag)"
    );
    let busybox =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-assets/arm64/bin/busybox");
    assert!(
        busybox.is_file(),
        "{} is missing: run .ci/run (apt-get download busybox-static:arm64)",
        busybox.display()
    );
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
