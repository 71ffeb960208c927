//! A real distribution server (`docker-registry`) on 127.0.0.1 for end-to-end tests, and a
//! user environment of its own to talk to it.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;

/// A `docker-registry` process on a free 127.0.0.1 port, killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

pub enum Setup {
    Plain,
    Tls,
    Htpasswd,
    /// Token auth: a token service (see [`TokenServer`]) on `realm_port` signs with the key
    /// whose certificate is `cert`.
    Token {
        realm_port: u16,
        cert: PathBuf,
    },
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn openssl(dir: &Path, args: &[&str]) {
    run_ok(tool("openssl").current_dir(dir).args(args));
}

impl Registry {
    pub fn start(setup: Setup) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{}\n",
            d.join("data").display(),
            port
        );
        match setup {
            Setup::Plain => {}
            Setup::Tls => {
                // A test CA, and a server certificate it signs for 127.0.0.1.
                openssl(
                    d,
                    &[
                        "req",
                        "-x509",
                        "-newkey",
                        "ec",
                        "-pkeyopt",
                        "ec_paramgen_curve:prime256v1",
                        "-nodes",
                        "-keyout",
                        "ca.key",
                        "-out",
                        "ca.crt",
                        "-days",
                        "2",
                        "-subj",
                        "/CN=builder test CA",
                    ],
                );
                openssl(
                    d,
                    &[
                        "req",
                        "-newkey",
                        "ec",
                        "-pkeyopt",
                        "ec_paramgen_curve:prime256v1",
                        "-nodes",
                        "-keyout",
                        "server.key",
                        "-out",
                        "server.csr",
                        "-subj",
                        "/CN=127.0.0.1",
                    ],
                );
                write(&d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n");
                openssl(
                    d,
                    &[
                        "x509",
                        "-req",
                        "-in",
                        "server.csr",
                        "-CA",
                        "ca.crt",
                        "-CAkey",
                        "ca.key",
                        "-CAcreateserial",
                        "-out",
                        "server.crt",
                        "-days",
                        "2",
                        "-extfile",
                        "ext.cnf",
                    ],
                );
                config += &format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    d.join("server.crt").display(),
                    d.join("server.key").display()
                );
            }
            Setup::Token { realm_port, cert } => {
                config += &format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: builder-test\n    issuer: builder-test-issuer\n    rootcertbundle: {}\n",
                    realm_port,
                    cert.display()
                );
            }
            Setup::Htpasswd => {
                let line = run_ok(tool("htpasswd").args(["-Bbn", "alice", "s3cret"]));
                write(&d.join("htpasswd"), &line);
                config += &format!(
                    "auth:\n  htpasswd:\n    realm: builder-test-realm\n    path: {}\n",
                    d.join("htpasswd").display()
                );
            }
        }
        write(&d.join("config.yml"), &config);
        // Its access log (one line a request), for the tests that count what moved.
        let log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join("access.log"))
                .unwrap()
        };
        let child = tool("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(log())
            .stderr(log())
            .spawn()
            .unwrap();
        let reg = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The requests the registry has logged so far, as `METHOD PATH` (the request line
    /// without its protocol).
    pub fn requests(&self) -> Vec<String> {
        let log = std::fs::read(self.dir.path().join("access.log")).unwrap_or_default();
        String::from_utf8_lossy(&log)
            .lines()
            .filter_map(|l| {
                let start = l.find("\"")? + 1;
                let line = &l[start..];
                let line = &line[..line.find('"')?];
                Some(line.trim_end_matches(" HTTP/1.1").to_string())
            })
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user's environment: its own HOME (auth file, certs.d), no inherited registry settings.
pub struct User {
    pub home: tempfile::TempDir,
}

impl User {
    pub fn new() -> User {
        User {
            home: tempfile::tempdir().unwrap(),
        }
    }

    pub fn builder(&self) -> Command {
        let mut c = builder();
        c.env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("BUILDER_REGISTRIES_CONFIG");
        c
    }

    /// `builder SUBCOMMAND --root ROOT`, as this user.
    pub fn on(&self, subcommand: &str, root: &Path) -> Command {
        let mut c = self.builder();
        c.args([subcommand, "--root"]).arg(root);
        c
    }

    pub fn assert_fsck_clean(&self, root: &Path) {
        let out = run(&mut self.on("fsck", root));
        assert!(out.status.success(), "fsck: {}", stderr_of(&out));
    }

    pub fn trust(&self, reg: &Registry) {
        let d = self
            .home
            .path()
            .join(".config/builder/certs.d")
            .join(reg.host());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(reg.ca(), d.join("ca.crt")).unwrap();
    }
}

/// `text` mentions every one of `needles` (shown whole when it does not).
pub fn assert_mentions(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "expected {:?} in:\n{}", n, text);
    }
}

pub fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or("").to_string()
}

/// A base image in the registry: busybox imported into a scratch store, then pushed.
pub fn push_base(user: &User, reg: &Registry) -> String {
    let root = tempfile::tempdir().unwrap();
    busybox_base(root.path(), "busybox:local");
    let out = run_ok(
        user.on("push", root.path())
            .arg("busybox:local")
            .arg(format!("{}/base", reg.host())),
    );
    last_line(&out)
}

/// A build context holding `files` (relative path, content).
pub fn context(files: &[(&str, String)]) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    for (path, text) in files {
        write(&ctx.path().join(path), text);
    }
    ctx
}

pub fn skopeo_digest(reg: &Registry, repo_tag: &str, extra: &[&str]) -> String {
    let out = run_ok(tool("skopeo").arg("inspect").args(extra).arg(format!(
        "docker://{}/{}",
        reg.host(),
        repo_tag
    )));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

/// The whole loop on one registry: push a base, build FROM it and push, pull into a fresh
/// store, compare, and ask skopeo what the registry serves.
/// A build with RUN steps in two stages, for the cache tests.
pub fn cache_context(reg: &Registry) -> tempfile::TempDir {
    context(&[
        ("Buildfile", format!(
            "FROM {0}/base AS deps\nRUN echo deps > /deps.txt\n\nFROM {0}/base\nCOPY --from=deps /deps.txt /deps.txt\nRUN echo step-one > /one\nCOPY src /src\nRUN cat /src/a /one > /two\n",
            reg.host()
        )),
        ("src/a", "some source\n".into()),
    ])
}

/// CACHED or DONE for each RUN step of a plain-progress build log, in order.
pub fn run_steps(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in log.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let (n, text) = rest.split_once(' ').unwrap_or((rest, ""));
        if text.starts_with('[') {
            if let Some((_, t)) = text.split_once("] ") {
                current = Some((n.to_string(), t.to_string()));
            }
        } else if text.starts_with("CACHED") || text.starts_with("DONE") {
            if let Some((id, t)) = &current {
                if id == n && t.starts_with("RUN") {
                    out.push(text.split(' ').next().unwrap().to_string());
                }
            }
        }
    }
    out
}

/// The `layer blobs downloaded: N` a build log ends with.
pub fn layers_downloaded(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("layer blobs downloaded: ").map(|(_, n)| n))
        .unwrap_or_else(|| panic!("the build does not say what it downloaded:\n{}", log));
    line.split(' ').next().unwrap().parse().unwrap()
}

/// Build `ctx` into a new, empty store with `flags`; returns the outcome (DONE or CACHED) of
/// each RUN step, the digest and the log.
pub fn build_fresh(user: &User, ctx: &Path, flags: &[String]) -> (Vec<String>, String, String) {
    let root = tempfile::tempdir().unwrap();
    let out = run(user
        .on("build", root.path())
        .args(["--progress", "plain"])
        .args(flags)
        .arg(ctx));
    let log = stderr_of(&out);
    assert!(out.status.success(), "{}", log);
    (
        run_steps(&log),
        last_line(&String::from_utf8_lossy(&out.stdout)),
        log,
    )
}
