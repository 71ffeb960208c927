//! RUN isolation tried as an attacker would, against both executors (builder's own and runc):
//! a statically linked probe (tests/isolation/probe.c) runs inside a step and tries to read the
//! host file system through a bind mount, remount the read-only context mount and write the
//! host's context, mount file systems, write /proc/sys, use device nodes, make namespaces,
//! call keyctl/bpf/module syscalls, and reach a server on the host's loopback. Every attempt
//! must fail. Also: Docker's capability set and seccomp mode as /proc reports them,
//! entitlements for host network and insecure steps, outbound traffic through the user-mode
//! stack to a test host in a network namespace, executors agreeing byte for byte on layers,
//! poisoned and sparse base layers, and FIFOs as bind sources.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

/// A server on the host's 127.0.0.1 that counts the connections it accepts.
struct HostServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl HostServer {
    fn start() -> HostServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if c.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        HostServer { port, accepted }
    }
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: busybox_dir() }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn ctx(&self, name: &str, buildfile: &str) -> PathBuf {
        let ctx = self.dir.path().join(name);
        write(&ctx.join("Buildfile"), buildfile);
        ctx
    }
    fn build(&self, ctx: &Path, extra: &[&str]) -> std::process::Output {
        run(builder()
            .args(["build", "--progress", "plain", "--root"])
            .arg(self.root())
            .args(extra)
            .arg(ctx))
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The probe's verdicts: (check, refused?, detail).
fn checks(log: &str) -> Vec<(String, bool, String)> {
    log.lines()
        .filter_map(|l| l.split_once("CHECK "))
        .filter_map(|(_, rest)| {
            let mut it = rest.splitn(3, ' ');
            let name = it.next()?.to_string();
            let verdict = it.next()?;
            Some((
                name,
                verdict == "refused",
                it.next().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

const EXECUTORS: &[&[&str]] = &[&[], &["--runtime", "runc"]];

#[test]
fn every_escape_attempt_fails_under_both_executors() {
    let e = Env::new();
    let server = HostServer::start();
    for (i, exec) in EXECUTORS.iter().enumerate() {
        let ctx = e.ctx(
            &format!("probe-{}", i),
            &format!(
                "FROM busybox:test\n\
                 COPY probe /probe\n\
                 RUN --mount=type=bind,target=/ctx /probe {port} /ctx\n\
                 RUN grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|Seccomp|NoNewPrivs):' /proc/self/status\n\
                 USER 1000\n\
                 RUN grep -E '^(CapEff|CapBnd):' /proc/self/status | sed 's/^/user /'\n",
                port = server.port
            ),
        );
        fs::copy(probe_binary(e.dir.path()), ctx.join("probe")).unwrap();
        let mut args = vec!["--no-cache"];
        args.extend_from_slice(exec);
        let out = e.build(&ctx, &args);
        let log = stderr(&out);
        assert!(out.status.success(), "{:?}: {log}", exec);
        let found = checks(&log);
        assert!(
            found.len() >= 35,
            "the probe ran every check ({:?}): {log}",
            exec
        );
        let escaped: Vec<_> = found.iter().filter(|(_, refused, _)| !refused).collect();
        assert!(escaped.is_empty(), "{:?}: escapes: {:?}", exec, escaped);
        assert!(
            !ctx.join("written-by-step").exists(),
            "the step wrote into the host's build context"
        );
        // Docker's 14 default capabilities (0xa80425fb), nothing inheritable or ambient.
        for want in [
            "CapInh:\t0000000000000000",
            "CapPrm:\t00000000a80425fb",
            "CapEff:\t00000000a80425fb",
            "CapBnd:\t00000000a80425fb",
            "CapAmb:\t0000000000000000",
            "Seccomp:\t2",
            "NoNewPrivs:\t0",
            "user CapEff:\t0000000000000000",
            "user CapBnd:\t00000000a80425fb",
        ] {
            assert!(log.contains(want), "{:?}: want {:?} in {log}", exec, want);
        }
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        0,
        "a step reached the host's loopback"
    );
}

#[test]
fn the_probe_can_tell_an_escape_from_a_refusal() {
    // Under the opt-in insecure mode the same probe must see the weakened sandbox; otherwise
    // the test above could pass without the probe detecting anything.
    let e = Env::new();
    let ctx = e.ctx(
        "insecure",
        "FROM busybox:test\nCOPY probe /probe\nRUN --security=insecure /probe 1 /tmp\n",
    );
    fs::copy(probe_binary(e.dir.path()), ctx.join("probe")).unwrap();
    let refused = e.build(&ctx, &[]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--allow security.insecure"),
        "{}",
        stderr(&refused)
    );
    let out = e.build(&ctx, &["--allow", "security.insecure"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let found = checks(&log);
    for name in ["mount_tmpfs", "unshare_net", "keyctl"] {
        assert!(
            found.iter().any(|(n, refused, _)| n == name && !refused),
            "{name} works under --security=insecure: {log}"
        );
    }
}

#[test]
fn host_network_needs_the_entitlement() {
    let e = Env::new();
    let ctx = e.ctx(
        "host",
        "FROM busybox:test\nRUN --network=host ls /sys/class/net > /dev/null\n",
    );
    let out = e.build(&ctx, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--allow network.host"),
        "{}",
        stderr(&out)
    );
    let out = e.build(&ctx, &["--network", "host", "--no-cache"]);
    assert!(!out.status.success(), "the build-wide flag needs it too");
    let out = e.build(&ctx, &["--allow", "network.host"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A test host: a network namespace of this test's own, joined to the host by a veth pair,
/// with a TCP server on its address. Traffic goes nowhere else: the route is checked first.
struct TestHost {
    ns: String,
    veth: String,
    addr: String,
    port: u16,
}

impl TestHost {
    fn start(served: &'static str) -> TestHost {
        let id = std::process::id() % 200 + 20;
        let ns = format!("bt-iso-{}", std::process::id());
        let veth = format!("bti{}", std::process::id() % 100000);
        let host_addr = format!("10.199.{}.1", id);
        let addr = format!("10.199.{}.2", id);
        let ip = |args: &[&str]| run_ok(tool("ip").args(args));
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{}/30", host_addr), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/30", addr),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &host_addr]);
        let route = ip(&["route", "get", &addr]);
        assert!(
            route.contains(&format!("dev {}", veth)),
            "the test host's address must route to its veth, not elsewhere: {route}"
        );
        // The server: a thread that enters the namespace, so it needs no other program.
        let (tx, rx) = std::sync::mpsc::channel();
        let nspath = format!("/run/netns/{}", ns);
        let bind = addr.clone();
        std::thread::spawn(move || {
            let f = fs::File::open(&nspath).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = TcpListener::bind(format!("{}:0", bind)).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            for mut c in l.incoming().flatten() {
                let mut req = [0u8; 256];
                let _ = c.read(&mut req);
                let _ = c.write_all(served.as_bytes());
            }
        });
        let port = rx.recv().unwrap();
        TestHost {
            ns,
            veth,
            addr,
            port,
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[test]
fn default_network_goes_out_through_the_user_mode_stack_but_never_to_host_loopback() {
    let e = Env::new();
    let server = HostServer::start();
    let testhost = TestHost::start("hello-from-the-test-host\n");
    {
        let helper = "slirp4netns";
        for (i, exec) in EXECUTORS.iter().enumerate() {
            let ctx = e.ctx(
                &format!("net-{}-{}", helper, i),
                &format!(
                    "FROM busybox:test\n\
                     RUN ls /sys/class/net; echo GET / | nc {addr} {port}; \
                     echo x | nc 127.0.0.1 {hp} && printf 'REACH%s\\n' ED-127; \
                     echo x | nc 10.0.2.2 {hp} && printf 'REACH%s\\n' ED-GATEWAY; true\n",
                    addr = testhost.addr,
                    port = testhost.port,
                    hp = server.port
                ),
            );
            let mut args = vec!["--no-cache"];
            args.extend_from_slice(exec);
            let out = run(builder()
                .args(["build", "--progress", "plain", "--root"])
                .arg(e.root())
                .args(&args)
                .arg(&ctx));
            let log = stderr(&out);
            assert!(out.status.success(), "{helper} {:?}: {log}", exec);
            assert!(
                log.contains("hello-from-the-test-host"),
                "{helper} {:?}: the step reaches a host outside: {log}",
                exec
            );
            assert!(!log.contains("REACHED"), "{helper} {:?}: {log}", exec);
            assert!(!log.contains("eth0"), "not the host's interfaces: {log}");
        }
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 0);
}

#[test]
fn a_missing_network_helper_is_an_error_never_the_host_network() {
    let e = Env::new();
    let ctx = e.ctx("nohelper", "FROM busybox:test\nRUN true\n");
    let empty = e.dir.path().join("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let out = run(builder()
        .env("PATH", &empty)
        .args(["build", "--progress", "plain", "--root"])
        .arg(e.root())
        .arg(&ctx));
    assert!(!out.status.success());
    let log = stderr(&out);
    assert!(
        log.contains("slirp4netns") && log.contains("--network=none"),
        "{log}"
    );
}

#[test]
fn both_executors_write_byte_identical_layers() {
    let e = Env::new();
    let buildfile = "FROM busybox:test\n\
        RUN mkdir -p /a/b && echo one > /a/b/f && ln -s /a/b/f /link && rm /bin/ls && chmod 4755 /a/b/f\n\
        RUN echo two >> /a/b/f && mkdir /tmp2 && touch /tmp2/x && rm -r /a/b\n";
    let mut digests = Vec::new();
    for (i, exec) in EXECUTORS.iter().enumerate() {
        let ctx = e.ctx(&format!("same-{}", i), buildfile);
        let mut args = vec!["--no-cache", "--source-date-epoch", "1000"];
        args.extend_from_slice(exec);
        digests.push(build(&e.root(), &ctx, &args));
    }
    assert_eq!(digests[0], digests[1], "builtin and runc agree");
}

#[test]
fn a_missing_runtime_is_a_clear_error() {
    let e = Env::new();
    let ctx = e.ctx("noruntime", "FROM busybox:test\nRUN true\n");
    let out = e.build(&ctx, &["--runtime", "no-such-runtime"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-runtime"), "{}", stderr(&out));
}

#[test]
fn debug_sandbox_prints_the_policy() {
    let out = run_ok(builder().args(["debug", "sandbox"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
    assert_eq!(caps.len(), 14);
    assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    let masked = v["linux"]["maskedPaths"].as_array().unwrap();
    assert!(masked.iter().any(|p| p == "/proc/kcore"));
    let ro = v["linux"]["readonlyPaths"].as_array().unwrap();
    assert!(ro.iter().any(|p| p == "/proc/sys"));
}

#[test]
fn a_fifo_as_bind_source_is_an_error_not_a_hang() {
    let e = Env::new();
    let ctx = e.ctx(
        "fifo",
        "FROM busybox:test\nRUN --mount=type=bind,source=pipe,target=/p,rw cat /p\n",
    );
    nix::unistd::mkfifo(
        &ctx.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let out = e.build(&ctx, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("pipe"), "{}", stderr(&out));
    // In the context a COPY passes over it, and says so.
    write(&ctx.join("Buildfile"), "FROM busybox:test\nCOPY . /c/\n");
    let out = e.build(&ctx, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("skipped pipe (a FIFO)"),
        "{}",
        stderr(&out)
    );
}

/// An OCI layout `dir` like `from`, but with layer `index` replaced by `tar` (gzipped here),
/// and the config's diff_id for it set to `claimed` (None: the truth).
fn relayer(from: &Path, dir: &Path, index: usize, tar: &[u8], claimed: Option<&str>) {
    use sha2::Digest as _;
    let hex = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    copy_dir(from, dir);
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index_json: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mdesc = index_json["manifests"][0].clone();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(mdesc["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    let gz = gz.finish().unwrap();
    let gz_digest = hex(&gz);
    fs::write(blob(&gz_digest), &gz).unwrap();
    manifest["layers"][index]["digest"] = format!("sha256:{}", gz_digest).into();
    manifest["layers"][index]["size"] = gz.len().into();
    let diff_id = claimed
        .map(str::to_string)
        .unwrap_or_else(|| format!("sha256:{}", hex(tar)));
    config["rootfs"]["diff_ids"][index] = diff_id.into();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = hex(&config_bytes);
    fs::write(blob(&config_digest), &config_bytes).unwrap();
    manifest["config"]["digest"] = format!("sha256:{}", config_digest).into();
    manifest["config"]["size"] = config_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = hex(&manifest_bytes);
    fs::write(blob(&manifest_digest), &manifest_bytes).unwrap();
    let mut index_json = index_json;
    index_json["manifests"][0]["digest"] = format!("sha256:{}", manifest_digest).into();
    index_json["manifests"][0]["size"] = manifest_bytes.len().into();
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index_json).unwrap(),
    )
    .unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let dst = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            fs::create_dir_all(&dst).unwrap();
        } else {
            fs::copy(entry.path(), &dst).unwrap();
        }
    }
}

fn tar_of(name: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, content).unwrap();
    b.into_inner().unwrap()
}

/// An honest layout: busybox plus one layer holding /f.txt.
fn honest_layout(e: &Env) -> PathBuf {
    let ctx = e.ctx("honest", "FROM busybox:test\nCOPY f.txt /f.txt\n");
    fs::write(ctx.join("f.txt"), "honest\n").unwrap();
    let layout = e.dir.path().join("honest-layout");
    build(
        &e.root(),
        &ctx,
        &["-o", &format!("oci:{}:t", layout.display())],
    );
    layout
}

#[test]
fn a_layer_that_lies_about_its_diff_id_is_refused_and_poisons_nothing() {
    let e = Env::new();
    let honest = honest_layout(&e);
    let config_diff_id = {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(honest.join("index.json")).unwrap()).unwrap();
        let blob = |d: &str| {
            honest
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let m: serde_json::Value = serde_json::from_slice(
            &fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        let c: serde_json::Value = serde_json::from_slice(
            &fs::read(blob(m["config"]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        c["rootfs"]["diff_ids"][1].as_str().unwrap().to_string()
    };
    // The hostile image claims the honest layer's diff_id (so the same chain id) for other bytes.
    let hostile = e.dir.path().join("hostile-layout");
    relayer(
        &honest,
        &hostile,
        1,
        &tar_of("f.txt", b"hostile\n"),
        Some(&config_diff_id),
    );
    let ctx = e.ctx(
        "use-hostile",
        &format!("FROM oci:{}:t\nRUN cat /f.txt\n", hostile.display()),
    );
    let out = e.build(&ctx, &[]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("diff_id"), "{}", stderr(&out));
    // A later honest build with the same chain id sees the honest content.
    let ctx = e.ctx(
        "use-honest",
        &format!("FROM oci:{}:t\nRUN cat /f.txt\n", honest.display()),
    );
    let out = e.build(&ctx, &[]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("honest") && !log.contains("hostile"), "{log}");
    let fsck = run(builder().args(["fsck", "--root"]).arg(e.root()));
    assert!(fsck.status.success(), "{}", stderr(&fsck));
}

#[test]
fn a_sparse_layer_entry_becomes_a_hole_not_gigabytes_of_zeros() {
    let e = Env::new();
    let honest = honest_layout(&e);
    // GNU tar writes the sparse map; 8 GiB apparent, one 4 KiB block of data.
    let src = e.dir.path().join("sparse-src");
    fs::create_dir_all(&src).unwrap();
    let f = fs::File::create(src.join("big")).unwrap();
    f.set_len(8 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"end", (8 << 30) - 3).unwrap();
    let tarfile = e.dir.path().join("sparse.tar");
    run_ok(
        tool("tar")
            .arg("--sparse")
            .arg("-cf")
            .arg(&tarfile)
            .arg("-C")
            .arg(&src)
            .arg("big"),
    );
    let tar = fs::read(&tarfile).unwrap();
    assert!(tar.len() < 1 << 20, "the archive itself is small");
    let layout = e.dir.path().join("sparse-layout");
    relayer(&honest, &layout, 1, &tar, None);
    let ctx = e.ctx(
        "use-sparse",
        &format!(
            "FROM oci:{}:t\nRUN du -k /big | sed 's/^/DU /'; tail -c 3 /big; echo\n",
            layout.display()
        ),
    );
    let out = e.build(&ctx, &[]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let du: u64 = log
        .lines()
        .find_map(|l| {
            l.split("DU ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("du output: {log}"));
    assert!(du < 1024, "the 8 GiB file takes {du} KiB on disk");
    assert!(log.contains("end"), "{log}");
}

/// The base stage of the user-database attacks: `setup` runs in a RUN and leaves the image's
/// /etc/passwd or /etc/group as an attacker shaped it.
fn user_db_attack(e: &Env, name: &str, setup: &str, then: &str, exec: &[&str]) -> (bool, String) {
    let ctx = e.ctx(name, &format!("FROM busybox:test\nRUN {setup}\n{then}\n"));
    write(&ctx.join("f"), "f\n");
    let mut args = vec!["--no-cache"];
    args.extend_from_slice(exec);
    let m = run_bounded(build_cmd(&e.root()).args(&args).arg(&ctx), 120);
    assert!(
        m.peak_under(512 * 1024),
        "{name}: builder took {} KiB",
        m.max_rss_kib
    );
    (m.out.status.success(), stderr(&m.out))
}

#[test]
fn users_and_groups_are_read_inside_the_image_never_from_the_host() {
    let e = Env::new();
    // A host file shaped like a passwd and group file, with ids the image does not have.
    let host = e.dir.path().join("host-db");
    write(&host, "evil:x:4242:4343::/:/bin/sh\nstaff:x:4242:evil\n");
    let climb = "../".repeat(40);
    let host_path = host.display().to_string();
    let links = [
        (
            "rel",
            format!(
                "ln -sf {climb}{} /etc/passwd && ln -sf {climb}{} /etc/group",
                &host_path[1..],
                &host_path[1..]
            ),
        ),
        (
            "abs",
            format!("ln -sf {host_path} /etc/passwd && ln -sf {host_path} /etc/group"),
        ),
    ];
    for (i, exec) in EXECUTORS.iter().enumerate() {
        for (kind, setup) in &links {
            for then in [
                "USER evil\nRUN id -u",
                "USER root:staff\nRUN id -g",
                "COPY --chown=evil f /f",
                "COPY --chown=0:staff f /f",
                "USER evil\nWORKDIR /w",
            ] {
                let (ok, log) = user_db_attack(&e, &format!("link-{kind}-{i}"), setup, then, exec);
                assert!(
                    !ok,
                    "{kind} {then:?} {exec:?}: built with the host's file: {log}"
                );
                assert!(
                    log.contains("unable to find user") || log.contains("unable to find group"),
                    "{kind} {then:?} {exec:?}: {log}"
                );
                assert!(!log.contains("4242") && !log.contains("4343"), "{log}");
            }
        }
        // A FIFO would block a reader forever; a device would feed it without end.
        for (kind, setup, what) in [
            (
                "fifo-passwd",
                "rm /etc/passwd && mkfifo /etc/passwd",
                "/etc/passwd is a FIFO",
            ),
            (
                "fifo-group",
                "rm /etc/group && mkfifo /etc/group",
                "/etc/group is a FIFO",
            ),
            (
                "zero-passwd",
                "rm /etc/passwd && mknod /etc/passwd c 1 5",
                "/etc/passwd is a character device",
            ),
            (
                "dir-group",
                "rm /etc/group && mkdir /etc/group",
                "/etc/group is a directory",
            ),
        ] {
            for then in ["USER app:staff\nRUN id", "COPY --chown=app:staff f /f"] {
                let (ok, log) = user_db_attack(&e, &format!("{kind}-{i}"), setup, then, exec);
                assert!(!ok, "{kind} {then:?} {exec:?}: {log}");
                assert!(
                    log.contains(what),
                    "{kind} {then:?} {exec:?}: want {what:?}: {log}"
                );
            }
        }
        // A link to /dev/zero resolves inside the image, where it is no device.
        let (ok, log) = user_db_attack(
            &e,
            &format!("zero-link-{i}"),
            "ln -sf /dev/zero /etc/passwd",
            "USER app\nRUN id -u",
            exec,
        );
        assert!(
            !ok && log.contains("unable to find user app"),
            "{exec:?}: {log}"
        );
        // A passwd file bigger than any real one is refused by its size, not read.
        let (ok, log) = user_db_attack(
            &e,
            &format!("big-{i}"),
            "head -c 5000000 /dev/zero >> /etc/passwd",
            "USER app\nRUN id -u",
            exec,
        );
        assert!(
            !ok && log.contains("over the limit of 4194304 bytes"),
            "{exec:?}: {log}"
        );
    }
}

#[test]
fn a_step_inherits_no_descriptor_and_its_pid_1_is_its_own_command() {
    use std::os::unix::process::CommandExt;
    let e = Env::new();
    let host_dir = e.dir.path().join("host-dir");
    fs::create_dir_all(&host_dir).unwrap();
    write(&host_dir.join("secret"), "host secret\n");
    let host_file = e.dir.path().join("host-file");
    write(&host_file, "");
    for (i, exec) in EXECUTORS.iter().enumerate() {
        let ctx = e.ctx(
            &format!("fds-{i}"),
            // The step lists its descriptors, tries to reach the host through each, and
            // writes to each; its markers are built at run time.
            "FROM busybox:test\n\
             RUN for fd in $(seq 3 20); do \
                   if [ -e /proc/self/fd/$fd ] && [ \"$(readlink /proc/self/fd/$fd)\" != /proc/$$/fd ]; then echo \"INHER\"\"ITED $fd $(readlink /proc/self/fd/$fd)\"; fi; \
                   cat /proc/self/fd/$fd/secret 2>/dev/null; echo x 2>/dev/null >&$fd; \
                 done; \
                 echo \"PID1=$(tr '\\0' ' ' </proc/1/cmdline)\"; echo \"ENV1=$(tr '\\0' ' ' </proc/1/environ)\"; echo \"ME=$$\"\n",
        );
        let mut cmd = build_cmd(&e.root());
        cmd.arg("--no-cache")
            .args(*exec)
            .arg(&ctx)
            .env("BUILDER_TEST_HOST_ONLY", "host-environment-value");
        // As a CI agent leaves them: fds 3-20 open on a host directory and a host file.
        let dir = fs::File::open(&host_dir).unwrap();
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&host_file)
            .unwrap();
        let (dir_fd, file_fd) = (
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            std::os::fd::AsRawFd::as_raw_fd(&file),
        );
        unsafe {
            cmd.pre_exec(move || {
                for fd in 3..=20 {
                    let from = if fd % 2 == 0 { file_fd } else { dir_fd };
                    if fd != from && libc::dup2(from, fd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let out = run(&mut cmd);
        let log = stderr(&out);
        assert!(out.status.success(), "{exec:?}: {log}");
        assert!(
            !log.contains("INHERITED"),
            "{exec:?}: a descriptor crossed into the step: {log}"
        );
        assert!(!log.contains("host secret"), "{exec:?}: {log}");
        assert_eq!(
            fs::read_to_string(&host_file).unwrap(),
            "",
            "{exec:?}: the step wrote a host file"
        );
        // The last lines that say so: the first are the progress echoing the command.
        let pid1 = log
            .lines()
            .filter_map(|l| l.split_once("PID1="))
            .last()
            .map(|(_, v)| v.trim())
            .unwrap_or_default();
        assert!(
            pid1.starts_with("/bin/sh -c "),
            "{exec:?}: PID 1 is {pid1:?}"
        );
        let env1 = log
            .lines()
            .filter_map(|l| l.split_once("ENV1="))
            .last()
            .map(|(_, v)| v)
            .unwrap_or_default();
        assert!(
            env1.contains("PATH=") && !env1.contains("host-environment-value"),
            "{exec:?}: {env1}"
        );
        let root = e.root().display().to_string();
        let seen = format!("{pid1} {env1}");
        for leak in [
            root.as_str(),
            ctx.to_str().unwrap(),
            env!("CARGO_BIN_EXE_builder"),
        ] {
            assert!(!seen.contains(leak), "{exec:?}: PID 1 shows {leak}: {seen}");
        }
        assert!(
            log.contains("ME=1"),
            "{exec:?}: the command is PID 1: {log}"
        );
    }
}

/// A context entry `flip` that a thread keeps swapping between a directory holding `s`
/// ("inside-ok!!") and a symlink to a host directory holding an `s` of the same size.
struct Flipper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Flipper {
    fn start(e: &Env, ctx: &Path) -> Flipper {
        let host = e.dir.path().join("host");
        // The same size as the context's file, so that only its content can tell them apart.
        write(&host.join("s"), "HOST-SECRET\n");
        let flip = ctx.join("flip");
        let inside = ctx.join("flip.dir");
        write(&inside.join("s"), "inside-ok!!\n");
        let link = ctx.join("flip.link");
        std::os::unix::fs::symlink(&host, &link).unwrap();
        fs::rename(&inside, &flip).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut flipped = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // flip: a directory <-> a symlink to the host's directory, each swap atomic.
                    let _ = fs::rename(&flip, &inside);
                    let _ = fs::rename(&link, &flip);
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    let _ = fs::rename(&flip, &link);
                    let _ = fs::rename(&inside, &flip);
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    flipped += 1;
                    // Now and then a still moment, so that some builds see only the directory
                    // even on a loaded machine.
                    if flipped % 50 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
                flipped
            })
        };
        Flipper { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn a_context_entry_flipped_to_a_host_symlink_is_never_followed() {
    let e = Env::new();
    let ctx = e.ctx("flip", "FROM scratch\nCOPY flip/s /x\n");
    let flipper = Flipper::start(&e, &ctx);
    let (mut built, mut refused) = (0, 0);
    for i in 0..200 {
        let out_dir = e.dir.path().join(format!("out-{i}"));
        let out = e.build(
            &ctx,
            &["--no-cache", "-o", &format!("local:{}", out_dir.display())],
        );
        if out.status.success() {
            let got = fs::read_to_string(out_dir.join("x")).unwrap();
            assert_eq!(got, "inside-ok!!\n", "build {i} copied a host file");
            built += 1;
        } else {
            refused += 1;
        }
    }
    let flipped = flipper.stop();
    assert!(flipped > 20, "the flipper ran ({flipped} flips)");
    assert!(
        built > 0,
        "some builds saw the directory ({built} built, {refused} refused)"
    );
}

#[test]
fn a_bind_mounted_context_entry_flipped_to_a_host_symlink_is_never_mounted() {
    let e = Env::new();
    for (i, exec) in EXECUTORS.iter().enumerate() {
        let ctx = e.ctx(
            &format!("bind-flip-{i}"),
            "FROM busybox:test\nRUN --mount=type=bind,source=flip,target=/m cat /m/s\n",
        );
        let flipper = Flipper::start(&e, &ctx);
        let mut built = 0;
        for n in 0..60 {
            let mut args = vec!["--no-cache"];
            args.extend_from_slice(exec);
            let out = e.build(&ctx, &args);
            let log = stderr(&out);
            assert!(
                !log.contains("HOST-SECRET"),
                "{exec:?} build {n} mounted the host's directory: {log}"
            );
            if out.status.success() {
                assert!(log.contains("inside-ok!!"), "{log}");
                built += 1;
            }
        }
        flipper.stop();
        assert!(built > 0, "{exec:?}: some builds saw the directory");
        fs::remove_dir_all(e.dir.path().join("host")).unwrap();
    }
}

#[test]
fn names_that_differ_only_in_invalid_utf8_never_share_a_cache_entry() {
    use std::os::unix::ffi::OsStrExt;
    let e = Env::new();
    let mut kept = Vec::new();
    for (i, byte) in [0xffu8, 0xfe].into_iter().enumerate() {
        let ctx = e.ctx(
            &format!("utf8-{i}"),
            "FROM busybox:test\nCOPY . /c/\nCOPY bad* /g/\n",
        );
        let bytes = [b'b', b'a', b'd', byte];
        let name = std::ffi::OsStr::from_bytes(&bytes);
        write(&ctx.join(name), "same content\n");
        let out_dir = e.dir.path().join(format!("utf8-out-{i}"));
        let out = e.build(&ctx, &["-o", &format!("local:{}", out_dir.display())]);
        let log = stderr(&out);
        assert!(out.status.success(), "{log}");
        if i == 1 {
            assert!(
                !log.contains("CACHED"),
                "the second context hit the first one's cache: {log}"
            );
        }
        for dir in ["c", "g"] {
            assert!(
                out_dir.join(dir).join(name).is_file(),
                "{dir}/bad\\x{byte:x} is in the image: {log}"
            );
        }
        kept.push(out_dir);
    }
}

/// The pids whose command line is `argv`.
fn processes_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn killing_builder_kills_a_step_running_as_another_user() {
    let e = Env::new();
    for (i, exec) in EXECUTORS.iter().enumerate() {
        // A duration no other test uses, to find the step's process by.
        let seconds = format!("{}", 8271 + i);
        let ctx = e.ctx(
            &format!("kill-{i}"),
            &format!("FROM busybox:test\nUSER 1000:1000\nRUN exec sleep {seconds}\n"),
        );
        let mut child = build_cmd(&e.root())
            .arg("--no-cache")
            .args(*exec)
            .arg(&ctx)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut started = false;
        for _ in 0..600 {
            if !processes_running(&["sleep", &seconds]).is_empty() {
                started = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(started, "{exec:?}: the step never started");
        child.kill().unwrap();
        child.wait().unwrap();
        let mut left = Vec::new();
        for _ in 0..200 {
            left = processes_running(&["sleep", &seconds]);
            if left.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            left.is_empty(),
            "{exec:?}: the step outlived builder: {left:?}"
        );
    }
}
