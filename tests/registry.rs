//! Registries, end to end, against the real distribution server (`docker-registry`) on
//! 127.0.0.1: plain HTTP, HTTPS with a test CA, and htpasswd Basic auth; the remote cache; and
//! a proxy that drops and stalls connections.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::registry::*;
use common::*;

fn app_context(reg: &Registry) -> tempfile::TempDir {
    context(&[
        ("Buildfile", format!(
            "FROM {}/base\nRUN echo built > /built\nCOPY hello.txt /hello.txt\nCMD [\"cat\", \"/hello.txt\"]\n",
            reg.host()
        )),
        ("hello.txt", "hello from the registry test\n".into()),
    ])
}

fn round_trip(user: &User, reg: &Registry, skopeo_flags: &[&str]) {
    push_base(user, reg);
    let ctx = app_context(reg);
    let a = tempfile::tempdir().unwrap();
    let app = format!("{}/app:1", reg.host());
    let built = last_line(&run_ok(
        user.on("build", a.path())
            .args(["--progress", "plain"])
            .args(["-t", &app, "--push"])
            .arg(ctx.path()),
    ));
    assert!(built.starts_with("sha256:"), "{}", built);

    let b = tempfile::tempdir().unwrap();
    let pulled = last_line(&run_ok(user.on("pull", b.path()).arg(&app)));
    assert_eq!(pulled, built, "the pulled image is the built image");
    assert_eq!(skopeo_digest(reg, "app:1", skopeo_flags), built);
    // The pulled image is usable: it inspects and fsck finds nothing wrong.
    run_ok(user.on("inspect", b.path()).arg(&app));
    user.assert_fsck_clean(b.path());
}

#[test]
fn plain_http_push_build_pull() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    round_trip(&user, &reg, &["--tls-verify=false"]);

    // Pushing the same image again uploads nothing.
    let a = tempfile::tempdir().unwrap();
    let app = format!("{}/app:1", reg.host());
    run_ok(user.on("pull", a.path()).arg(&app));
    let again = run(user.on("push", a.path()).arg(&app));
    assert!(again.status.success(), "{}", stderr_of(&again));
    let msg = stderr_of(&again);
    assert_mentions(&msg, &["0 blobs uploaded", "manifest unchanged"]);

    // Another repository of the same registry gets the blobs by cross-repository mount.
    let copy = run(user
        .on("push", a.path())
        .arg(&app)
        .arg(format!("{}/copy:1", reg.host())));
    let msg = stderr_of(&copy);
    assert!(copy.status.success(), "{}", msg);
    assert_mentions(&msg, &["0 blobs uploaded", "manifest uploaded"]);
    assert!(!msg.contains(" 0 mounted"), "{}", msg);
    assert_eq!(
        skopeo_digest(&reg, "copy:1", &["--tls-verify=false"]),
        skopeo_digest(&reg, "app:1", &["--tls-verify=false"])
    );

    // -o type=image,name=...,push=true pushes too; a digest reference pins.
    let ctx = app_context(&reg);
    let c = tempfile::tempdir().unwrap();
    let out = run_ok(
        user.on("build", c.path())
            .args(["--progress", "plain"])
            .arg("-o")
            .arg(format!("type=image,name={}/other:2,push=true", reg.host()))
            .arg(ctx.path()),
    );
    let digest = last_line(&out);
    assert_eq!(
        skopeo_digest(&reg, "other:2", &["--tls-verify=false"]),
        digest
    );
    let d = tempfile::tempdir().unwrap();
    let pinned = format!("{}/other@{}", reg.host(), digest);
    assert_eq!(
        last_line(&run_ok(user.on("pull", d.path()).arg(&pinned))),
        digest
    );
    // A tag that names another image than the pinned digest is an error.
    let wrong = format!("{}/base:latest@{}", reg.host(), digest);
    let out = run(user.on("pull", d.path()).arg(&wrong));
    assert!(!out.status.success());
    assert_mentions(&stderr_of(&out), &["digest"]);
}

#[test]
fn pull_policies_and_clear_errors() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let root = tempfile::tempdir().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    write(
        &ctx.path().join("Buildfile"),
        &format!("FROM {}/base\nRUN true\n", reg.host()),
    );
    let build = |pull: &str| {
        run(user
            .on("build", root.path())
            .args(["--progress", "plain"])
            .arg(format!("--pull={}", pull))
            .arg(ctx.path()))
    };
    // never: the store does not have it yet.
    let out = build("never");
    assert!(!out.status.success());
    assert_mentions(&stderr_of(&out), &["--pull never"]);
    // missing: pulls once, then uses the stored copy.
    let out = build("missing");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_mentions(&stderr_of(&out), &["pulling"]);
    let out = build("missing");
    assert!(!stderr_of(&out).contains("pulling"), "{}", stderr_of(&out));
    // always: asks the registry, downloads nothing it already has.
    let out = build("always");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_mentions(&stderr_of(&out), &["0 of 2 blobs downloaded"]);
    let out = build("never");
    assert!(out.status.success(), "{}", stderr_of(&out));

    // A missing tag names repository and tag.
    let out = run(user
        .on("pull", root.path())
        .arg(format!("{}/base:nope", reg.host())));
    assert!(!out.status.success());
    let msg = stderr_of(&out);
    assert_mentions(&msg, &["not found", "\"base\"", "\"nope\""]);
    // A refused connection says so.
    let closed = free_port();
    let out = run(user
        .on("pull", root.path())
        .arg(format!("127.0.0.1:{}/x", closed))
        .env("BUILDER_REGISTRY_ATTEMPTS", "2"));
    assert_mentions(&stderr_of(&out), &["refused"]);
    // An unknown host says so.
    let out = run(user.on("pull", root.path()).arg("no-such-host.invalid/x"));
    assert_mentions(
        &stderr_of(&out),
        &["cannot resolve the registry host no-such-host.invalid"],
    );
    // Nothing half-done is left behind.
    user.assert_fsck_clean(root.path());
}

#[test]
fn https_with_a_test_ca() {
    let reg = Registry::start(Setup::Tls);
    let user = User::new();
    // Without the CA, TLS fails and the error names the host.
    let root = tempfile::tempdir().unwrap();
    busybox_base(root.path(), "busybox:local");
    let out = run(user
        .on("push", root.path())
        .arg("busybox:local")
        .arg(format!("{}/base", reg.host())));
    assert!(!out.status.success());
    let msg = stderr_of(&out);
    assert_mentions(&msg, &["TLS", &reg.host()]);
    // Listed as insecure, the host's certificate is not checked (but TLS is still used).
    let settings = user.home.path().join(".config/builder/registries.json");
    write(
        &settings,
        &format!("{{\"insecure-registries\": [\"{}\"]}}", reg.host()),
    );
    let out = run(user
        .on("push", root.path())
        .arg("busybox:local")
        .arg(format!("{}/insecure", reg.host())));
    assert!(out.status.success(), "{}", stderr_of(&out));
    std::fs::remove_file(&settings).unwrap();
    // With the CA in certs.d, everything works over HTTPS.
    user.trust(&reg);
    let cert_dir = reg.dir.path().join("skopeo-certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(reg.ca(), cert_dir.join("ca.crt")).unwrap();
    round_trip(&user, &reg, &["--cert-dir", cert_dir.to_str().unwrap()]);
}

#[test]
fn basic_auth_login_logout_and_helpers() {
    let reg = Registry::start(Setup::Htpasswd);
    let user = User::new();
    let root = tempfile::tempdir().unwrap();
    busybox_base(root.path(), "busybox:local");
    let push = || {
        run(user
            .on("push", root.path())
            .arg("busybox:local")
            .arg(format!("{}/base", reg.host())))
    };
    // No credentials: 401, with the realm named.
    let out = push();
    assert!(!out.status.success());
    let msg = stderr_of(&out);
    assert_mentions(&msg, &["401", "builder-test-realm"]);
    assert!(
        msg.contains(&format!(
            "hint: the registry wants credentials: builder login {}",
            reg.host()
        )),
        "a 401 says how to log in: {msg}"
    );
    // A build whose FROM needs the credentials says the same.
    let ctx = tempfile::tempdir().unwrap();
    write(
        &ctx.path().join("Buildfile"),
        &format!("FROM {}/private:1\n", reg.host()),
    );
    let out = run(user.on("build", root.path()).arg(ctx.path()));
    let msg = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        msg.contains(&format!(
            "hint: the registry wants credentials: builder login {}",
            reg.host()
        )),
        "{msg}"
    );
    // A wrong password is refused and not saved.
    let out = run(user
        .builder()
        .args(["login", "-u", "alice", "-p", "wrong"])
        .arg(reg.host()));
    assert!(!out.status.success());
    assert!(!user.home.path().join(".docker/config.json").exists());
    // The right one is saved as base64 in ~/.docker/config.json.
    let mut login = user.builder();
    login
        .args(["login", "-u", "alice", "--password-stdin"])
        .arg(reg.host())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = login.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(user.home.path().join(".docker/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["auths"][reg.host()]["auth"], "YWxpY2U6czNjcmV0");
    round_trip(
        &user,
        &reg,
        &["--creds", "alice:s3cret", "--tls-verify=false"],
    );

    // Logged out: 401 again.
    run_ok(user.builder().arg("logout").arg(reg.host()));
    assert!(!push().status.success());

    // A credential helper named by credHelpers answers instead (docker-credential-* protocol).
    let bin = tempfile::tempdir().unwrap();
    let helper = bin.path().join("docker-credential-testhelper");
    write(
        &helper,
        "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 1\necho \"{\\\"ServerURL\\\":\\\"$server\\\",\\\"Username\\\":\\\"alice\\\",\\\"Secret\\\":\\\"s3cret\\\"}\"\n",
    );
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&helper).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let auth_file = user.home.path().join("auth.json");
    write(
        &auth_file,
        &format!(
            "{{\"credHelpers\": {{\"{}\": \"testhelper\"}}}}",
            reg.host()
        ),
    );
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(user
        .builder()
        .env("PATH", &path)
        .env("REGISTRY_AUTH_FILE", &auth_file)
        .args(["push", "--root"])
        .arg(root.path())
        .arg("busybox:local")
        .arg(format!("{}/helped", reg.host())));
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn remote_cache_through_a_registry_and_a_directory() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let ctx = cache_context(&reg);
    let cache_ref = format!("{}/cache:main", reg.host());
    let local_cache = tempfile::tempdir().unwrap();
    let (steps, built, _) = build_fresh(
        &user,
        ctx.path(),
        &[
            "--cache-to".into(),
            format!("type=registry,ref={},mode=max", cache_ref),
            "--cache-to".into(),
            format!("type=local,dest={},mode=max", local_cache.path().display()),
        ],
    );
    assert!(steps.iter().all(|s| s == "DONE"));

    // An empty store with the registry cache: every step hits, nothing runs, same digest.
    let from_registry = [
        "--cache-from".into(),
        format!("type=registry,ref={}", cache_ref),
    ];
    let (steps, digest, log) = build_fresh(&user, ctx.path(), &from_registry);
    assert_eq!(steps.len(), 3, "{}", log);
    assert!(steps.iter().all(|s| s == "CACHED"), "{:?}\n{}", steps, log);
    assert_eq!(digest, built);

    // mode=min (the default) holds the final stage only: the deps stage runs again, the
    // rest hits, and the digest is still the same.
    let dir_min = tempfile::tempdir().unwrap();
    let to_min = [
        "--cache-to".into(),
        format!("type=local,dest={}", dir_min.path().display()),
    ];
    build_fresh(&user, ctx.path(), &to_min);
    let from_min = [
        "--cache-from".into(),
        format!("type=local,src={}", dir_min.path().display()),
    ];
    let (steps, digest, log) = build_fresh(&user, ctx.path(), &from_min);
    assert_eq!(steps, vec!["DONE", "CACHED", "CACHED"], "{}", log);
    assert_eq!(digest, built);

    // The max cache written to a directory serves an empty store the same way.
    let from_max = [
        "--cache-from".into(),
        format!("type=local,src={}", local_cache.path().display()),
    ];
    let (steps, digest, _) = build_fresh(&user, ctx.path(), &from_max);
    assert!(steps.iter().all(|s| s == "CACHED"));
    assert_eq!(digest, built);
}

#[test]
fn a_cached_ci_build_pushing_to_the_same_registry_moves_no_layer_bytes() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let ctx = cache_context(&reg);
    let cache = format!("type=registry,ref={}/cache:ci", reg.host());
    // The first CI job: an empty store. The base image's layer is fetched because a RUN
    // reads it; the cache and the image go to the registry.
    let (steps, built, log) = build_fresh(
        &user,
        ctx.path(),
        &[
            "--cache-to".into(),
            format!("{},mode=max", cache),
            "-t".into(),
            format!("{}/app:1", reg.host()),
            "--push".into(),
        ],
    );
    assert!(steps.iter().all(|s| s == "DONE"), "{:?}", steps);
    assert_eq!(layers_downloaded(&log), 1, "only the base layer: {}", log);

    // The next job, on a fresh machine: every step hits the imported cache, and the image
    // (SBOM and provenance included) is pushed to another repository of the registry.
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("metadata.json");
    let before = reg.requests().len();
    let out = run(user
        .on("build", root.path())
        .args(["--progress", "plain", "--cache-from", &cache])
        .arg("--metadata-file")
        .arg(&meta)
        .args(["-t", &format!("{}/deploy:1", reg.host()), "--push"])
        .arg(ctx.path()));
    let log = stderr_of(&out);
    assert!(out.status.success(), "{}", log);
    assert_eq!(last_line(&String::from_utf8_lossy(&out.stdout)), built);
    let steps = run_steps(&log);
    assert!(
        steps.len() == 3 && steps.iter().all(|s| s == "CACHED"),
        "{:?}\n{}",
        steps,
        log
    );
    // Counted by builder...
    assert_eq!(layers_downloaded(&log), 0, "{}", log);
    // ...and by the registry: no layer was read, and each was mounted, not uploaded.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let layers: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    // The base layer, COPY --from, RUN, COPY, RUN.
    assert_eq!(layers.len(), 5, "{}", m);
    let requests = reg.requests()[before..].to_vec();
    for l in &layers {
        let touching: Vec<&String> = requests.iter().filter(|r| r.contains(l.as_str())).collect();
        assert!(
            touching
                .iter()
                .all(|r| r.starts_with("HEAD ") || r.contains("?mount=")),
            "layer {} moved: {:?}",
            l,
            touching
        );
        assert!(
            touching.iter().any(|r| r.contains("?mount=")),
            "layer {} was not mounted: {:?}",
            l,
            requests
        );
    }
    assert_eq!(
        skopeo_digest(&reg, "deploy:1", &["--tls-verify=false"]),
        built
    );

    // The layers left at the registry come in when something reads them: an export of the
    // image from that store is whole, and the store stays consistent.
    let layout = root.path().join("layout");
    run_ok(
        user.on("export", root.path())
            .arg(format!("{}/deploy:1", reg.host()))
            .arg("-o")
            .arg(format!("oci:{}", layout.display())),
    );
    let after = reg.requests();
    for l in &layers {
        assert!(
            after
                .iter()
                .any(|r| r.starts_with("GET ") && r.contains(l.as_str())),
            "the export did not fetch {}",
            l
        );
        let hex = l.trim_start_matches("sha256:");
        assert!(layout.join("blobs/sha256").join(hex).is_file());
    }
    user.assert_fsck_clean(root.path());
}

/// A TCP proxy to `upstream` that breaks connections. Of every 3 connections: one stalls
/// (held open, silent); one has answers cut after `cut_after` bytes and requests too; one has
/// answers cut after 4 × `cut_after`. So no download larger than that finishes on one
/// connection. With `break_all`, every connection is dropped at once.
struct FaultProxy {
    port: u16,
    connections: Arc<AtomicUsize>,
    /// Answers cut short, and connections stalled.
    cuts: Arc<AtomicUsize>,
    stalls: Arc<AtomicUsize>,
}

/// Copy until EOF, or until `limit` bytes (then hang up); true when the limit cut it.
fn pipe(mut from: TcpStream, mut to: TcpStream, limit: Option<usize>) -> bool {
    let mut cut = false;
    let mut buf = [0u8; 16 << 10];
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(l) if sent + n >= l => {
                let _ = to.write_all(&buf[..l.saturating_sub(sent)]);
                cut = true;
                break;
            }
            _ => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
    cut
}

impl FaultProxy {
    fn start(upstream: u16, cut_after: usize, break_all: bool) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let (cuts, stalls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let count = connections.clone();
        let (cuts2, stalls2) = (cuts.clone(), stalls.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst);
                if break_all {
                    drop(client);
                    continue;
                }
                let (cuts, stalls) = (cuts2.clone(), stalls2.clone());
                std::thread::spawn(move || {
                    match n % 3 {
                        // Stalled: accept, say nothing, hang up much later.
                        2 => {
                            stalls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_secs(8));
                            drop(client);
                        }
                        kind => {
                            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                                return;
                            };
                            let (c2, s2) =
                                (client.try_clone().unwrap(), server.try_clone().unwrap());
                            let up_limit = (kind == 1).then_some(cut_after);
                            std::thread::spawn(move || pipe(c2, s2, up_limit));
                            let down_limit = if kind == 1 { cut_after } else { 4 * cut_after };
                            if pipe(server, client, Some(down_limit)) {
                                cuts.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                });
            }
        });
        FaultProxy {
            port,
            connections,
            cuts,
            stalls,
        }
    }
}

#[test]
fn faults_are_retried_or_reported_and_leave_nothing_partial() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    // A base with a few MB of incompressible data, so transfers span many reads and chunks.
    let root = tempfile::tempdir().unwrap();
    busybox_base(root.path(), "busybox:local");
    let ctx = tempfile::tempdir().unwrap();
    let mut noise = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(ctx.path().join("noise.bin"), &noise).unwrap();
    write(
        &ctx.path().join("Buildfile"),
        "FROM busybox:local\nCOPY noise.bin /noise.bin\n",
    );
    let built = build(
        root.path(),
        ctx.path(),
        &["-t", "big:1", "--progress", "plain"],
    );

    let proxy = FaultProxy::start(reg.port, 64 << 10, false);
    let through = format!("127.0.0.1:{}", proxy.port);
    let faulty = |c: &mut Command| {
        c.env("BUILDER_REGISTRY_TIMEOUT", "2")
            .env("BUILDER_REGISTRY_ATTEMPTS", "8")
            .env("BUILDER_PUSH_CHUNK_SIZE", "1048576");
    };
    let mut push = user.builder();
    faulty(&mut push);
    let out = run(push
        .args(["push", "--root"])
        .arg(root.path())
        .arg("big:1")
        .arg(format!("{}/big:1", through)));
    assert!(
        out.status.success(),
        "push through the faulty proxy: {}",
        stderr_of(&out)
    );
    // The registry's tag names the image built (its attestations are its referrers).
    let pushed = last_line(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        skopeo_digest(&reg, "big:1", &["--tls-verify=false"]),
        pushed
    );
    assert_eq!(pushed, built);

    let fresh = tempfile::tempdir().unwrap();
    let mut pull = user.builder();
    faulty(&mut pull);
    let out = run(pull
        .args(["pull", "--root"])
        .arg(fresh.path())
        .arg(format!("{}/big:1", through)));
    assert!(
        out.status.success(),
        "pull through the faulty proxy: {}",
        stderr_of(&out)
    );
    let told = stderr_of(&out);
    assert!(
        told.contains("resuming at byte"),
        "a cut download resumes: {}",
        told
    );
    assert_eq!(last_line(&String::from_utf8_lossy(&out.stdout)), built);
    // The transfers really met faults: answers cut mid-body and stalled connections.
    let (cuts, stalls) = (
        proxy.cuts.load(Ordering::SeqCst),
        proxy.stalls.load(Ordering::SeqCst),
    );
    eprintln!(
        "proxy: {} connections, {} cut, {} stalled",
        proxy.connections.load(Ordering::SeqCst),
        cuts,
        stalls
    );
    assert!(cuts > 0 && stalls > 0, "cuts {} stalls {}", cuts, stalls);
    user.assert_fsck_clean(fresh.path());

    // A proxy that breaks every connection: a clear error after the retry budget, and
    // nothing partial in the store.
    let dead = FaultProxy::start(reg.port, 0, true);
    let empty = tempfile::tempdir().unwrap();
    let mut pull = user.builder();
    pull.env("BUILDER_REGISTRY_ATTEMPTS", "3");
    let out = run(pull
        .args(["pull", "--root"])
        .arg(empty.path())
        .arg(format!("127.0.0.1:{}/big:1", dead.port)));
    assert!(!out.status.success());
    let msg = stderr_of(&out);
    assert_mentions(&msg, &["gave up after 3 attempts"]);
    let leftovers: Vec<_> = walkdir::WalkDir::new(empty.path())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.path().to_string_lossy().contains("blob"))
        .collect();
    assert!(leftovers.is_empty(), "{:?}", leftovers);
    let images = run_ok(&mut user.on("images", empty.path()));
    assert!(!images.contains("big"), "{}", images);
}

/// A token service as the distribution spec's token flow describes: it answers
/// `GET /token?service=…&scope=…` with a JWT (RS256, signed by openssl, its certificate in
/// `x5c`) granting pull to anyone and push to alice. It records the scopes it was asked for.
struct TokenServer {
    port: u16,
    dir: tempfile::TempDir,
    scopes: Arc<std::sync::Mutex<Vec<String>>>,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TokenServer {
    fn start() -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        openssl(
            &d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.crt",
                "-days",
                "2",
                "-subj",
                "/CN=builder token signer",
            ],
        );
        openssl(
            &d,
            &[
                "x509",
                "-in",
                "token.crt",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ],
        );
        let der = std::fs::read(d.join("token.der")).unwrap();
        let x5c = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(der)
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let scopes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = scopes.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && conn.read(&mut byte).map(|k| k == 1).unwrap_or(false)
                {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_string();
                let alice = head.lines().any(|l| {
                    l.to_lowercase().starts_with("authorization: basic ")
                        && l.ends_with("YWxpY2U6czNjcmV0")
                });
                let query = target.split_once('?').map(|x| x.1).unwrap_or("");
                let mut access = Vec::new();
                for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                    if k != "scope" {
                        continue;
                    }
                    let scope = url_decode(v);
                    seen.lock().unwrap().push(scope.clone());
                    let mut parts = scope.splitn(3, ':');
                    let (kind, name, actions) = (
                        parts.next().unwrap_or(""),
                        parts.next().unwrap_or(""),
                        parts.next().unwrap_or(""),
                    );
                    let granted: Vec<&str> = actions
                        .split(',')
                        .filter(|a| *a == "pull" || (*a == "push" && alice))
                        .collect();
                    access
                        .push(serde_json::json!({"type": kind, "name": name, "actions": granted}));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
                let claims = serde_json::json!({
                    "iss": "builder-test-issuer", "sub": if alice { "alice" } else { "" }, "aud": "builder-test",
                    "exp": now + 600, "nbf": now - 60, "iat": now - 60, "jti": format!("t{}", n), "access": access,
                });
                let signing_input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let input_file = d.join(format!("in{}", n));
                std::fs::write(&input_file, &signing_input).unwrap();
                let sig = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(d.join("token.key"))
                    .arg(&input_file)
                    .output()
                    .unwrap()
                    .stdout;
                let token = format!("{}.{}", signing_input, b64url(&sig));
                let body = serde_json::json!({"token": token}).to_string();
                let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.len(), body);
            }
        });
        TokenServer { port, dir, scopes }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("token.crt")
    }
}

#[test]
fn bearer_tokens_with_per_repository_scopes() {
    let tokens = TokenServer::start();
    let reg = Registry::start(Setup::Token {
        realm_port: tokens.port,
        cert: tokens.cert(),
    });
    let user = User::new();
    let root = tempfile::tempdir().unwrap();
    busybox_base(root.path(), "busybox:local");
    let push = |dest: &str| {
        run(user
            .on("push", root.path())
            .arg("busybox:local")
            .arg(format!("{}/{}", reg.host(), dest)))
    };
    // Anonymous tokens carry pull only: the push is refused, naming the token realm.
    let out = push("base");
    assert!(!out.status.success());
    let msg = stderr_of(&out);
    assert_mentions(&msg, &["401", &format!("127.0.0.1:{}/token", tokens.port)]);
    // Logged in, the token grants push for the repository asked for.
    run_ok(
        user.builder()
            .args(["login", "-u", "alice", "-p", "s3cret"])
            .arg(reg.host()),
    );
    let out = push("base");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let asked = tokens.scopes.lock().unwrap().clone();
    assert!(
        asked.contains(&"repository:base:pull,push".to_string()),
        "{:?}",
        asked
    );
    // A build FROM it and a pull into a fresh store use pull tokens.
    let ctx = app_context(&reg);
    let built = last_line(&run_ok(
        user.on("build", root.path())
            .args(["--progress", "plain"])
            .args(["-t", &format!("{}/app:1", reg.host()), "--push"])
            .arg(ctx.path()),
    ));
    let fresh = tempfile::tempdir().unwrap();
    let pulled = last_line(&run_ok(
        user.on("pull", fresh.path())
            .arg(format!("{}/app:1", reg.host())),
    ));
    assert_eq!(pulled, built);
    assert!(tokens
        .scopes
        .lock()
        .unwrap()
        .contains(&"repository:app:pull".to_string()));
}

#[test]
fn pull_picks_the_platform_from_an_index() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY arch.txt /arch.txt\nLABEL arch=$TARGETARCH\n",
    );
    write(&ctx.join("arch.txt"), "same file, two platforms\n");
    // Two single-platform builds in one OCI layout, then an image index over them.
    let layout = work.path().join("layout");
    let root = work.path().join("root");
    let mut digests = Vec::new();
    for (arch, tag) in [("amd64", "a"), ("arm64", "b")] {
        let out = run_ok(
            user.on("build", &root)
                .args([
                    "--progress",
                    "quiet",
                    "--platform",
                    &format!("linux/{}", arch),
                    "-o",
                    &format!("oci:{}:{}", layout.display(), tag),
                ])
                .arg(&ctx),
        );
        digests.push(last_line(&out));
    }
    assert_ne!(digests[0], digests[1]);
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let entries: Vec<serde_json::Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| serde_json::json!({"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"], "platform": m["platform"]}))
        .collect();
    let nested = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries})).unwrap();
    let nested_hex = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&nested))
    };
    std::fs::write(layout.join("blobs/sha256").join(&nested_hex), &nested).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{}", nested_hex),
            "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    run_ok(
        tool("skopeo")
            .args(["copy", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:multi", layout.display()))
            .arg(format!("docker://{}/multi:1", reg.host())),
    );

    let mut named = Vec::new();
    for (platform, want) in [("linux/amd64", &digests[0]), ("linux/arm64", &digests[1])] {
        let fresh = tempfile::tempdir().unwrap();
        // The name stands for the registry's index; the image stored is the platform's.
        named.push(last_line(&run_ok(
            user.on("pull", fresh.path())
                .args(["--platform", platform])
                .arg(format!("{}/multi:1", reg.host())),
        )));
        let inspect: serde_json::Value = serde_json::from_str(&run_ok(
            user.on("inspect", fresh.path())
                .arg(format!("{}/multi:1", reg.host())),
        ))
        .unwrap();
        assert_eq!(
            inspect["digest"].as_str(),
            Some(want.as_str()),
            "{}",
            platform
        );
        user.assert_fsck_clean(fresh.path());
    }
    assert_eq!(named[0], named[1], "both pulls name the index");
    let raw = run_ok(
        tool("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}/multi:1", reg.host())),
    );
    use sha2::Digest as _;
    assert_eq!(
        named[0],
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(raw.as_bytes()))
        ),
        "the index digest, as the registry has it"
    );
    // A platform the index lacks is named, with what it offers.
    let fresh = tempfile::tempdir().unwrap();
    let out = run(user
        .on("pull", fresh.path())
        .args(["--platform", "linux/s390x"])
        .arg(format!("{}/multi:1", reg.host())));
    assert!(!out.status.success());
    assert_mentions(
        &stderr_of(&out),
        &["linux/s390x", "linux/amd64", "linux/arm64"],
    );
}

#[test]
fn mirrors_from_the_settings_file_are_tried_first() {
    let mirror = Registry::start(Setup::Plain);
    let user = User::new();
    let digest = push_base(&user, &mirror);
    // The registry itself is down; its mirror (from registries.json) has the image.
    let down = format!("127.0.0.1:{}", free_port());
    write(
        &user.home.path().join(".config/builder/registries.json"),
        &format!(
            "{{\"mirrors\": {{\"{}\": [\"http://{}\"]}}}}",
            down,
            mirror.host()
        ),
    );
    let fresh = tempfile::tempdir().unwrap();
    let got = last_line(&run_ok(
        user.on("pull", fresh.path()).arg(format!("{}/base", down)),
    ));
    assert_eq!(got, digest);
    // The store knows it by the name asked for.
    run_ok(
        user.on("inspect", fresh.path())
            .arg(format!("{}/base:latest", down)),
    );
    // A settings file that does not parse is named.
    write(
        &user.home.path().join(".config/builder/registries.json"),
        "{not json",
    );
    let out = run(user.on("pull", fresh.path()).arg(format!("{}/base", down)));
    assert!(!out.status.success());
    assert_mentions(&stderr_of(&out), &["registries.json", "not valid JSON"]);
}

#[test]
fn a_multi_platform_index_pushes_whole_and_pulls_per_platform() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    let root = tempfile::tempdir().unwrap();
    let ctx = context(&[
        (
            "Buildfile",
            "FROM scratch\nARG TARGETARCH\nCOPY $TARGETARCH.txt /arch.txt\n".into(),
        ),
        ("amd64.txt", "amd64\n".into()),
        ("arm64.txt", "arm64\n".into()),
    ]);
    let name = format!("{}/multi:1", reg.host());
    let built = last_line(&run_ok(
        user.on("build", root.path())
            .args([
                "--platform",
                "linux/amd64,linux/arm64",
                "-t",
                &name,
                "--push",
            ])
            .arg(ctx.path()),
    ));
    let raw = run_ok(
        tool("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}", name)),
    );
    use sha2::Digest as _;
    assert_eq!(
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(raw.as_bytes()))
        ),
        built,
        "the registry holds the index byte for byte"
    );
    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let kinds: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["vnd.docker.reference.type"]
                .as_str()
                .unwrap_or_else(|| m["platform"]["architecture"].as_str().unwrap())
        })
        .collect();
    // Each platform's image; their attestations are their referrers (tests/provenance.rs).
    assert_eq!(kinds, vec!["amd64", "arm64"]);
    // Each platform's manifest is there by digest, and a pull takes the one asked for.
    let b = tempfile::tempdir().unwrap();
    let pulled = last_line(&run_ok(
        user.on("pull", b.path())
            .args(["--platform", "linux/arm64"])
            .arg(&name),
    ));
    assert_eq!(
        pulled, built,
        "push and pull back give the same index digest"
    );
    let inspect = run_ok(user.on("inspect", b.path()).arg(&name));
    assert!(inspect.contains("arm64"), "{inspect}");
    user.assert_fsck_clean(b.path());
    // A build for the platform the store lacks pulls it, under the same name.
    let ctx = context(&[(
        "Buildfile",
        format!(
            "FROM {}
COPY --from={} /arch.txt /copied
",
            name, name
        ),
    )]);
    run_ok(
        user.on("build", b.path())
            .args(["--platform", "linux/amd64", "-t", "uses:1"])
            .arg(ctx.path()),
    );
    let inspect = run_ok(user.on("inspect", b.path()).arg("uses:1"));
    assert!(inspect.contains("amd64"), "{inspect}");
}

/// With `--attest-layout index`, a build pushes its attestations in BuildKit's layout; a
/// pull of one platform takes the image and its attestations, never the attestation as an
/// image. (The default, referrers, is tests/provenance.rs.)
#[test]
fn a_pushed_image_carries_its_attestations_and_a_pull_ignores_them() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let ctx = app_context(&reg);
    let a = tempfile::tempdir().unwrap();
    let app = format!("{}/attested:1", reg.host());
    let built = last_line(&run_ok(
        user.on("build", a.path())
            .args(["--progress", "plain", "--attest-layout", "index"])
            .args(["-t", &app, "--push"])
            .arg(ctx.path()),
    ));
    let raw = run_ok(
        tool("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}", app)),
    );
    use sha2::Digest as _;
    assert_eq!(
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(raw.as_bytes()))
        ),
        built,
        "the tag names the index the build printed"
    );
    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{}", raw);
    assert_eq!(manifests[0]["platform"]["architecture"], "amd64");
    let att = &manifests[1];
    assert_eq!(
        att["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        manifests[0]["digest"]
    );
    assert_eq!(att["platform"]["os"], "unknown");
    // The attestation manifest and its statements are in the registry.
    let att_digest = att["digest"].as_str().unwrap();
    let att_raw = run_ok(
        tool("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}/attested@{}", reg.host(), att_digest)),
    );
    let att_manifest: serde_json::Value = serde_json::from_str(&att_raw).unwrap();
    let predicates: Vec<&str> = att_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        predicates,
        vec![
            "https://slsa.dev/provenance/v1",
            "https://spdx.dev/Document"
        ]
    );
    // A pull takes the platform's image (never the attestation manifest as an image), and
    // the image's attestations with it: the name can be pushed on whole.
    let b = tempfile::tempdir().unwrap();
    let pulled = last_line(&run_ok(user.on("pull", b.path()).arg(&app)));
    assert_eq!(pulled, built);
    let inspect: serde_json::Value =
        serde_json::from_str(&run_ok(user.on("inspect", b.path()).arg(&app))).unwrap();
    assert_eq!(inspect["digest"], manifests[0]["digest"]);
    let att_hex = att_digest.trim_start_matches("sha256:");
    assert!(b.path().join("blobs/sha256").join(att_hex).exists());
    user.assert_fsck_clean(b.path());
    let again = run(user
        .on("push", b.path())
        .arg(&app)
        .arg(format!("{}/again:1", reg.host())));
    assert!(again.status.success(), "{}", stderr_of(&again));
    // skopeo picks the image for its platform, too.
    let out = tempfile::tempdir().unwrap();
    run_ok(
        tool("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{}", app))
            .arg(format!("oci:{}:x", out.path().join("l").display())),
    );
}

#[test]
fn a_registry_base_of_another_platform_is_warned_about_after_its_pull() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    // An arm64-only image at the registry.
    let maker = tempfile::tempdir().unwrap();
    let base_ctx = context(&[
        ("Buildfile", "FROM scratch\nCOPY f /f\n".into()),
        ("f", "arm\n".into()),
    ]);
    let arm = format!("{}/arm:1", reg.host());
    run_ok(
        user.on("build", maker.path())
            .args(["--platform", "linux/arm64", "-t", &arm, "--push"])
            .arg(base_ctx.path()),
    );
    // A host-platform build on it, from an empty store: nothing of the base is known before
    // the build pulls it, and the warning comes with the other findings at the end.
    let ctx = context(&[
        ("Buildfile", format!("FROM {}\nCOPY g /g\n", arm)),
        ("g", "g\n".into()),
    ]);
    let fresh = tempfile::tempdir().unwrap();
    let out = run(user
        .on("build", fresh.path())
        .args(["--progress", "plain"])
        .arg(ctx.path()));
    let err = stderr_of(&out);
    assert!(out.status.success(), "a warning, not an error: {err}");
    assert!(
        err.lines()
            .any(|l| l.contains("Buildfile:1:1: InvalidBaseImagePlatform:")
                && l.contains("linux/arm64")),
        "{err}"
    );
}

#[test]
fn a_base_of_several_layers_is_fetched_and_unpacked_side_by_side_on_an_empty_store() {
    // Four layers left at the registry: each is fetched, verified and unpacked (the fetches
    // run ahead of the unpacks), and the first RUN sees all of them.
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    let root = tempfile::tempdir().unwrap();
    busybox_base(root.path(), "busybox:local");
    let parts = context(&[
        ("a/one.txt", "first layer\n".repeat(3000)),
        ("b/two.txt", "second layer\n".repeat(5000)),
        ("c/three.txt", "third layer\n".repeat(200)),
    ]);
    write(
        &parts.path().join("Buildfile"),
        "FROM busybox:local\nCOPY a/ /a/\nCOPY b/ /b/\nCOPY c/ /c/\n",
    );
    build(root.path(), parts.path(), &["-t", "layered:1"]);
    run_ok(
        user.on("push", root.path())
            .arg("layered:1")
            .arg(format!("{}/layered:1", reg.host())),
    );
    let ctx = context(&[(
        "Buildfile",
        format!(
            "FROM {}/layered:1\nRUN wc -l /a/one.txt /b/two.txt /c/three.txt > /counts\n",
            reg.host()
        ),
    )]);
    let fresh = tempfile::tempdir().unwrap();
    let layout = fresh.path().join("layout");
    let out = run(user
        .on("build", fresh.path())
        .args(["--progress", "plain", "-o"])
        .arg(format!("type=local,dest={}", layout.display()))
        .arg(ctx.path()));
    let log = stderr_of(&out);
    assert!(out.status.success(), "{}", log);
    assert_eq!(layers_downloaded(&log), 4, "{}", log);
    let counts = std::fs::read_to_string(layout.join("counts")).unwrap();
    for (n, file) in [
        (3000, "/a/one.txt"),
        (5000, "/b/two.txt"),
        (200, "/c/three.txt"),
    ] {
        assert!(
            counts
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [&n.to_string(), file]),
            "{file}: {counts}"
        );
    }
    user.assert_fsck_clean(fresh.path());
}
