//! Helpers for end-to-end tests: run the real `builder` binary and the real OCI tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod registry;

pub fn builder() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_builder"));
    c.env_remove("SOURCE_DATE_EPOCH").env_remove("BUILDER_ROOT");
    c
}

/// Run a command, returning its output; panics with stderr when `ok` and it failed.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {}", cmd, e));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{:?} failed:\nstdout: {}\nstderr: {}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `builder build --progress plain --network none --root ROOT`, for more arguments.
pub fn build_cmd(root: &Path) -> Command {
    let mut c = builder();
    c.args([
        "build",
        "--progress",
        "plain",
        "--network",
        "none",
        "--root",
    ])
    .arg(root);
    c
}

/// The tool must be installed (`.ci/run` installs it); a missing tool fails the test.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{} is not installed: run .ci/run or apt-get install it",
        name
    );
    Command::new(name)
}

/// `builder build` into `root`; returns the manifest digest (last stdout line).
pub fn build(root: &Path, context: &Path, extra: &[&str]) -> String {
    let out = run_ok(
        builder()
            .arg("build")
            .arg("--root")
            .arg(root)
            .args(extra)
            .arg(context),
    );
    out.lines().last().unwrap_or("").to_string()
}

pub fn write(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

pub fn testdata(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(rel)
}

/// A busybox base image in `root`, made with `builder import` from the host's static busybox.
pub fn busybox_base(root: &Path, name: &str) {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static is not installed: run .ci/run");
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::copy(bb, r.join("bin/busybox")).unwrap();
    for a in [
        "sh", "cat", "ls", "id", "echo", "stat", "rm", "mkdir", "touch", "date", "sleep", "true",
        "false", "env", "pwd", "wc",
    ] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        r.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .unwrap();
    run_ok(
        builder()
            .args(["import", "--root"])
            .arg(root)
            .arg(r)
            .args(["-t", name]),
    );
}

/// A scratch directory whose `root/` store holds the `busybox:test` base image.
pub fn busybox_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    busybox_base(&dir.path().join("root"), "busybox:test");
    dir
}

/// Unpack an OCI layout tag with umoci; returns the bundle directory.
pub fn umoci_unpack(layout: &Path, tag: &str, into: &Path) -> PathBuf {
    let bundle = into.join("bundle");
    run_ok(
        tool("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{}", layout.display(), tag))
            .arg(&bundle),
    );
    bundle
}

/// What [`run_bounded`] saw of a finished child: its output and its peak resident memory.
pub struct Measured {
    pub out: Output,
    /// The child's peak RSS in KiB, from `getrusage` of that child alone (through `wait4`).
    /// The kernel counts into it the memory of the test process that spawned it (the
    /// address space an exec replaces): a figure at or below `spawner_kib` says only that the
    /// child never grew past the test process.
    pub max_rss_kib: u64,
    pub spawner_kib: u64,
}

impl Measured {
    /// Whether the child's own peak stayed under `limit_kib`.
    pub fn peak_under(&self, limit_kib: u64) -> bool {
        self.max_rss_kib < limit_kib || self.max_rss_kib <= self.spawner_kib
    }
}

/// This process's own peak RSS in KiB.
fn own_peak_kib() -> u64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64
}

/// Run `cmd` to its end and measure its peak memory. A child still running after
/// `hang_secs` is killed and the test fails: a hang guard, not a timing assertion.
pub fn run_bounded(cmd: &mut Command, hang_secs: u64) -> Measured {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let spawner_kib = own_peak_kib();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {}", cmd, e));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out_t = drain(Box::new(child.stdout.take().unwrap()));
    let err_t = drain(Box::new(child.stderr.take().unwrap()));
    let pid = child.id() as libc::pid_t;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(hang_secs);
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: wait4 writes the status and the usage it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break (status, usage);
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{:?} still ran after {} s: it hangs", cmd, hang_secs);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    Measured {
        out,
        max_rss_kib: usage.ru_maxrss as u64,
        spawner_kib: spawner_kib.max(own_peak_kib()),
    }
}
pub mod docker;

/// Compile the isolation probe (tests/isolation/probe.c) statically (gcc and libc6-dev,
/// which .ci/run installs).
pub fn probe_binary(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/isolation/probe.c");
    let out = dir.join("probe");
    run_ok(
        tool("cc")
            .args(["-static", "-O1", "-o"])
            .arg(&out)
            .arg(&src),
    );
    out
}

/// Start `cmd` on a new pty of `cols` columns: its stdin, stderr and (unless `stdout` is
/// given) stdout are the terminal end. Returns the child and the other end, which reads
/// EIO once the command and all it started are gone. Neither end leaks into what other
/// tests start meanwhile.
pub fn spawn_on_pty(
    cmd: &mut Command,
    cols: u16,
    stdout: Option<std::process::Stdio>,
) -> (std::process::Child, std::fs::File) {
    use std::os::fd::AsRawFd;
    use std::process::Stdio;
    let size = nix::pty::Winsize {
        ws_row: 60,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let terminal = || Stdio::from(pty.slave.try_clone().unwrap());
    let child = cmd
        .stdin(terminal())
        .stdout(stdout.unwrap_or_else(terminal))
        .stderr(terminal())
        .spawn()
        .unwrap();
    // The command keeps what it was given until told otherwise.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    (child, std::fs::File::from(pty.master))
}

/// The arm64 busybox `.ci/run` unpacked, once emulation is known to work; `None` (after a
/// loud message) only when the kernel has no binfmt_misc at all.
pub fn arm64_busybox(test: &str) -> Option<PathBuf> {
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc");
    if !binfmt.join("register").exists() {
        eprintln!(
            "\n*** SKIPPED {}: the kernel has no binfmt_misc mounted at {} (mount -t binfmt_misc \
             binfmt_misc {}) ***\n",
            test,
            binfmt.display(),
            binfmt.display()
        );
        return None;
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
    Some(busybox)
}

/// A base index for amd64 and arm64 made from the two static busyboxes.
pub fn two_platform_base(root: &Path, dir: &Path, arm64_busybox: &Path) {
    let base = dir.join("base");
    let host_bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static is not installed: run .ci/run");
    for (arch, bb) in [("amd64", Path::new(host_bb)), ("arm64", arm64_busybox)] {
        let bin = base.join(format!("rootfs-{arch}/bin"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(bb, bin.join("busybox")).unwrap();
        for applet in ["sh", "uname", "cat", "echo"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    write(
        &base.join("Buildfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY rootfs-$TARGETARCH/ /\n",
    );
    build(
        root,
        &base,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            "multi-base:1",
        ],
    );
}

/// Answer a bounded number of HTTP requests on 127.0.0.1 with `response`; returns the port.
pub fn serve_raw(response: Vec<u8>, requests: usize) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&response);
        }
    });
    port
}

/// Serve `body` over HTTP on 127.0.0.1 for a bounded number of requests; returns the port.
pub fn serve(body: Vec<u8>, requests: usize) -> u16 {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    serve_raw(response, requests)
}

/// The layers (media type, digest, diff_id) of the image tagged `tag` in an OCI layout.
pub fn layout_layers(layout: &Path, tag: &str) -> Vec<(String, String, String)> {
    let read = |d: &str| -> serde_json::Value {
        let p = layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let manifest = read(entry["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
        .map(|(l, d)| {
            (
                l["mediaType"].as_str().unwrap().to_string(),
                l["digest"].as_str().unwrap().to_string(),
                d.as_str().unwrap().to_string(),
            )
        })
        .collect()
}
