//! The differential suite: every case under `testdata/parity/` is built by docker (dockerd's
//! BuildKit, the oracle) and by builder, and the two images must agree.
//!
//! A case is a directory holding a `Buildfile`, an optional `context/` and an optional `case`
//! file of `key: value` lines:
//! - `arg: K=V` a build argument; `target: STAGE` the target stage;
//! - `fails: true` both builders must refuse the build;
//! - `oracle: golden` syntax dockerd 20.10 does not know: builder's image is compared with the
//!   case's `expected` file, written from BuildKit's documented behaviour;
//! - `prepare: SHELL` run in the copied context before building (hard links, modes, FIFOs:
//!   what git cannot store);
//! - `ignore: WHAT REASON` a documented deviation: the summary line for `WHAT` (a path, or a
//!   config key such as `config.Healthcheck`) is left out of the comparison.
//!
//! One deviation holds for every case: dockerd 20.10's BuildKit leaves in a RUN's layer the
//! empty directories it made as mount points (`/proc`, `/dev`, `/sys`, `/etc`, `--mount`
//! targets and their new parents); BuildKit v0.11 and later removes them
//! (`executor/stubs.go`, `MountStubsCleaner`), as builder does. Such a directory in docker's
//! image that builder's lacks (with nothing below it) is left out; the golden case
//! `golden-run-mount-stubs` holds today's behaviour.
//!
//! What is compared is a text summary of each image: its config fields, its history
//! (`created_by` and `empty_layer`), and every path of the merged filesystem that differs from
//! the base image, with type, mode, owner, size, content hash, link target and hard-link peers.
//! mtimes are not compared.
//!
//! Docker: `BUILDER_PARITY_DOCKER_HOST` names a running dockerd (`.ci/run` starts one);
//! without it the suite starts its own, off the host network. `PARITY_CASE=NAME` runs one case;
//! `PARITY_BLESS=1` rewrites the `expected` file of golden cases from builder's output.

mod common;

use common::docker::Docker;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

const BASE: &str = "busybox:parity";

/// One case's `case` file.
#[derive(Default)]
struct Case {
    args: Vec<String>,
    target: Option<String>,
    fails: bool,
    golden: bool,
    prepare: Vec<String>,
    ignore: Vec<String>,
}

fn read_case(dir: &Path) -> Case {
    let mut case = Case::default();
    let Ok(text) = std::fs::read_to_string(dir.join("case")) else {
        return case;
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("{}: bad line {:?}", dir.display(), line));
        let value = value.trim().to_string();
        match key {
            "arg" => case.args.push(value),
            "target" => case.target = Some(value),
            "fails" => case.fails = value == "true",
            "oracle" => case.golden = value == "golden",
            "prepare" => case.prepare.push(value),
            "ignore" => {
                let (what, reason) = value.split_once(' ').unwrap_or((&value, ""));
                assert!(
                    !reason.trim().is_empty(),
                    "{}: an ignore needs its reason",
                    dir.display()
                );
                case.ignore.push(what.to_string());
            }
            _ => panic!("{}: unknown key {:?}", dir.display(), key),
        }
    }
    case
}

/// One path of a merged filesystem.
#[derive(Clone, PartialEq)]
struct Node {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    hash: String,
    link: String,
    /// Extended attributes, `k=v` sorted and joined.
    xattrs: String,
    inode: usize,
}

/// An image as the comparison sees it: its config and history lines, and its merged tree.
struct Image {
    lines: Vec<String>,
    tree: BTreeMap<String, Node>,
}

fn read_member(archive: &Path, name: &str) -> Vec<u8> {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if path.trim_start_matches("./") == name {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).unwrap();
            return buf;
        }
    }
    panic!("{} has no {}", archive.display(), name)
}

fn normal(path: &str) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    let p = p.trim_end_matches('/');
    format!("/{}", p)
}

/// Apply one layer tar onto `tree`, whiteouts included.
fn apply_layer(tree: &mut BTreeMap<String, Node>, bytes: &[u8], next_inode: &mut usize) {
    let reader: Box<dyn Read> = if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut ar = tar::Archive::new(reader);
    let mut added: Vec<(String, Node)> = Vec::new();
    let mut links: Vec<(String, String)> = Vec::new();
    let mut opaque: Vec<String> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = normal(&entry.path().unwrap().to_string_lossy());
        let (dir, file) = match path.rsplit_once('/') {
            Some((d, f)) => (if d.is_empty() { "/" } else { d }, f),
            None => ("/", path.as_str()),
        };
        if file == ".wh..wh..opq" {
            opaque.push(dir.to_string());
            continue;
        }
        if let Some(hidden) = file.strip_prefix(".wh.") {
            removed.push(format!("{}/{}", dir.trim_end_matches('/'), hidden));
            continue;
        }
        let mut xattrs: Vec<String> = entry
            .pax_extensions()
            .ok()
            .flatten()
            .map(|exts| {
                exts.flatten()
                    .filter_map(|x| {
                        let k = x.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_string();
                        Some(format!(
                            "{}={}",
                            k,
                            String::from_utf8_lossy(x.value_bytes())
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let xattrs = xattrs.join(",");
        let h = entry.header();
        let mode = h.mode().unwrap_or(0) & 0o7777;
        let uid = h.uid().unwrap_or(0);
        let gid = h.gid().unwrap_or(0);
        let et = h.entry_type();
        if et.is_hard_link() {
            let target = normal(&entry.link_name().unwrap().unwrap().to_string_lossy());
            links.push((path, target));
            continue;
        }
        let kind = match et {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            _ => 'f',
        };
        let link = if kind == 'l' {
            entry
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else if kind == 'c' || kind == 'b' {
            format!(
                "{},{}",
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0)
            )
        } else {
            String::new()
        };
        let (size, hash) = if kind == 'f' {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).unwrap();
            use sha2::Digest;
            (
                buf.len() as u64,
                hex::encode(&sha2::Sha256::digest(&buf)[..8]),
            )
        } else {
            (0, String::new())
        };
        *next_inode += 1;
        added.push((
            path,
            Node {
                kind,
                mode,
                uid,
                gid,
                size,
                hash,
                link,
                xattrs,
                inode: *next_inode,
            },
        ));
    }
    let under = |p: &str, d: &str| d == "/" || p.starts_with(&format!("{}/", d));
    for d in &opaque {
        tree.retain(|p, _| !under(p, d));
    }
    for r in &removed {
        tree.retain(|p, _| p != r && !under(p, r));
    }
    for (path, node) in added {
        // A non-directory replaces a directory and everything under it.
        if node.kind != 'd' {
            tree.retain(|p, _| !under(p, &path));
        }
        tree.insert(path, node);
    }
    for (path, target) in links {
        let node = tree
            .get(&target)
            .cloned()
            .unwrap_or_else(|| panic!("hard link {} to a missing {}", path, target));
        tree.insert(path, node);
    }
}

/// Read a docker archive (`docker save`, or builder's `docker-archive:` output).
fn read_image(archive: &Path) -> Image {
    let manifest: serde_json::Value =
        serde_json::from_slice(&read_member(archive, "manifest.json")).unwrap();
    let m = &manifest[0];
    let config: serde_json::Value =
        serde_json::from_slice(&read_member(archive, m["Config"].as_str().unwrap())).unwrap();
    let mut lines = Vec::new();
    let c = &config["config"];
    for key in [
        "Env",
        "Cmd",
        "ArgsEscaped",
        "Entrypoint",
        "WorkingDir",
        "User",
        "ExposedPorts",
        "Volumes",
        "Labels",
        "StopSignal",
        "Healthcheck",
        "Shell",
        "OnBuild",
    ] {
        let v = &c[key];
        let empty = v.is_null()
            || v.as_str() == Some("")
            || v.as_array().is_some_and(|a| a.is_empty())
            || v.as_object().is_some_and(|o| o.is_empty());
        if !empty {
            lines.push(format!("config.{} {}", key, v));
        }
    }
    for (i, h) in config["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        // Each builder signs its steps (" # buildkit", " # builder"); the step itself is compared.
        let created_by = h["created_by"].as_str().unwrap_or("");
        let created_by = created_by
            .strip_suffix(" # buildkit")
            .or_else(|| created_by.strip_suffix(" # builder"))
            .unwrap_or(created_by);
        // One line each: a heredoc's newlines are shown escaped.
        let created_by = created_by.replace('\n', "\\n");
        lines.push(format!(
            "history.{} {}{}",
            i,
            if h["empty_layer"].as_bool() == Some(true) {
                "(empty) "
            } else {
                ""
            },
            created_by
        ));
    }
    let mut tree = BTreeMap::new();
    let mut inode = 0;
    for layer in m["Layers"].as_array().unwrap() {
        let bytes = read_member(archive, layer.as_str().unwrap());
        apply_layer(&mut tree, &bytes, &mut inode);
    }
    tree.remove("/");
    Image { lines, tree }
}

/// The comparison's text: config and history lines, then every path that differs from `base`.
fn summary(image: &Image, base: &Image) -> Vec<String> {
    let mut peers: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (p, n) in &image.tree {
        if n.kind != 'd' {
            peers.entry(n.inode).or_default().push(p);
        }
    }
    let base_history = base
        .lines
        .iter()
        .filter(|l| l.starts_with("history."))
        .count();
    let mut out: Vec<String> = image
        .lines
        .iter()
        .filter(|l| {
            // The base image's own history entries are the same on both sides.
            match l.strip_prefix("history.") {
                Some(rest) => rest
                    .split(' ')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i >= base_history),
                None => true,
            }
        })
        .cloned()
        .collect();
    for (p, n) in &image.tree {
        let same = base.tree.get(p).is_some_and(|b| {
            let mut b = b.clone();
            b.inode = n.inode;
            b == *n
        });
        let linked = peers.get(&n.inode).map(|v| v.len()).unwrap_or(0) > 1;
        if same && !linked {
            continue;
        }
        let mut line = format!("{} {} {:04o} {}:{}", p, n.kind, n.mode, n.uid, n.gid);
        match n.kind {
            'f' => line.push_str(&format!(" {} {}", n.size, n.hash)),
            'l' => line.push_str(&format!(" -> {}", n.link)),
            'c' | 'b' => line.push_str(&format!(" {}", n.link)),
            _ => {}
        }
        if !n.xattrs.is_empty() {
            line.push_str(&format!(" xattrs={}", n.xattrs));
        }
        if linked {
            let group = &peers[&n.inode];
            line.push_str(&format!(" links={}", group.join(",")));
        }
        out.push(line);
    }
    for p in base.tree.keys() {
        if !image.tree.contains_key(p) {
            out.push(format!("{} deleted", p));
        }
    }
    out
}

/// Both summaries without the mount-point directories dockerd 20.10 leaves and BuildKit
/// v0.11+ removes (see the module's notes), for one of the sandbox's mount points, a
/// `--mount` target of `build_file` or a parent of one: docker's directory line when ours
/// has nothing at or below it, and our `deleted` line when docker's has none.
fn without_mount_stubs(
    docker: Vec<String>,
    ours: Vec<String>,
    build_file: &str,
) -> (Vec<String>, Vec<String>) {
    let mut points: BTreeSet<String> = ["/proc", "/dev", "/sys", "/etc/hosts", "/etc/resolv.conf"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    points.insert("/run/secrets/x".into());
    points.insert("/run/buildkit/ssh_agent.0".into());
    for word in build_file.split(|c: char| c == ',' || c.is_whitespace()) {
        for key in ["target=", "dst=", "destination="] {
            if let Some(t) = word.strip_prefix(key) {
                let t = t.trim_matches('"');
                points.insert(format!("/{}", t.trim_start_matches('/')));
            }
        }
    }
    // Every mount point and its parents.
    let mut stubs: BTreeSet<String> = BTreeSet::new();
    for p in &points {
        let mut cur = p.trim_end_matches('/').to_string();
        while !cur.is_empty() {
            stubs.insert(cur.clone());
            cur = match cur.rfind('/') {
                Some(i) => cur[..i].to_string(),
                None => String::new(),
            };
        }
    }
    let has = |lines: &[String], p: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{} ", p)) || l.starts_with(&format!("{}/", p)))
    };
    let docker_kept: Vec<String> = docker
        .iter()
        .filter(|l| {
            let Some((path, rest)) = l.split_once(' ') else {
                return true;
            };
            !(rest.starts_with("d ") && stubs.contains(path) && !has(&ours, path))
        })
        .cloned()
        .collect();
    let ours_kept: Vec<String> = ours
        .iter()
        .filter(|l| {
            let Some(path) = l.strip_suffix(" deleted") else {
                return true;
            };
            !stubs.contains(path) || docker.contains(l)
        })
        .cloned()
        .collect();
    (docker_kept, ours_kept)
}

fn ignored(line: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|w| {
        line == w
            || line.starts_with(&format!("{} ", w))
            || (w.ends_with('/') && line.starts_with(w.as_str()))
    })
}

fn copy_tree(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// The base image both builders start from: static busybox with every applet, and the users
/// and groups of Docker Hub's busybox (root, daemon, bin, nobody/nogroup, ...).
fn make_base(store: &Path, docker: &Docker, scratch: &Path) -> Image {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static is not installed: run .ci/run");
    let r = scratch.join("base");
    for d in ["bin", "etc", "tmp", "root", "home", "var/www", "usr/sbin"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy(bb, r.join("bin/busybox")).unwrap();
    let list = run_ok(Command::new(r.join("bin/busybox")).arg("--list"));
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
         bin:x:2:2:bin:/bin:/bin/false\nwww-data:x:33:33:www-data:/var/www:/bin/false\n\
         nobody:x:65534:65534:nobody:/home:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        r.join("etc/group"),
        "root:x:0:\ndaemon:x:1:\nbin:x:2:\nwww-data:x:33:\nstaff:x:50:app\napp:x:1000:\n\
         nogroup:x:65534:\n",
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("1777").arg(r.join("tmp")));
    run_ok(Command::new("chmod").arg("700").arg(r.join("root")));
    run_ok(
        builder()
            .args(["import", "--root"])
            .arg(store)
            .arg(&r)
            .args(["-t", BASE]),
    );
    let archive = scratch.join("base.tar");
    run_ok(
        builder()
            .args(["export", "--root"])
            .arg(store)
            .arg("-o")
            .arg(format!("docker-archive:{}", archive.display()))
            .arg(BASE),
    );
    run_ok(docker.cmd().arg("load").arg("-i").arg(&archive));
    read_image(&archive)
}

enum Outcome {
    Built(PathBuf),
    Failed(String),
}

/// The build file, build args, target and context of a case, as both CLIs spell them.
fn case_args<'c>(cmd: &'c mut Command, case: &Case, ctx: &Path) -> &'c mut Command {
    cmd.arg("-f").arg(ctx.join("Buildfile"));
    for a in &case.args {
        cmd.arg("--build-arg").arg(a);
    }
    if let Some(t) = &case.target {
        cmd.arg("--target").arg(t);
    }
    cmd.arg(ctx)
}

fn build_with_docker(docker: &Docker, name: &str, ctx: &Path, case: &Case, out: &Path) -> Outcome {
    let tag = format!("parity-{}:latest", name.to_lowercase());
    let mut cmd = docker.cmd();
    cmd.args(["build", "--network=none", "--progress=plain", "-t", &tag]);
    let built = run(case_args(&mut cmd, case, ctx));
    if !built.status.success() {
        return Outcome::Failed(String::from_utf8_lossy(&built.stderr).into_owned());
    }
    run_ok(docker.cmd().arg("save").arg("-o").arg(out).arg(&tag));
    let _ = run(docker.cmd().args(["rmi", "-f", &tag]));
    Outcome::Built(out.to_path_buf())
}

fn build_with_builder(store: &Path, ctx: &Path, case: &Case, out: &Path) -> Outcome {
    let mut cmd = build_cmd(store);
    cmd.arg("-o")
        .arg(format!("docker-archive:{}", out.display()));
    let built = run(case_args(&mut cmd, case, ctx));
    if !built.status.success() {
        return Outcome::Failed(String::from_utf8_lossy(&built.stderr).into_owned());
    }
    Outcome::Built(out.to_path_buf())
}

/// Build one case both ways; returns what differs, or nothing when the two agree.
fn check_case(
    dir: &Path,
    docker: &Docker,
    store: &Path,
    base: &Image,
    scratch: &Path,
) -> Option<String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case = read_case(dir);
    let work = scratch.join(&name);
    std::fs::create_dir_all(&work).unwrap();
    let ctx = work.join("context");
    if dir.join("context").is_dir() {
        copy_tree(&dir.join("context"), &ctx);
    } else {
        std::fs::create_dir_all(&ctx).unwrap();
    }
    // The build file sits in the context, as a user's Dockerfile does.
    std::fs::copy(dir.join("Buildfile"), ctx.join("Buildfile")).unwrap();
    for p in &case.prepare {
        run_ok(Command::new("sh").arg("-ec").arg(p).current_dir(&ctx));
    }
    let ours = build_with_builder(store, &ctx, &case, &work.join("builder.tar"));
    let expected: Vec<String> = if case.golden {
        match std::fs::read_to_string(dir.join("expected")) {
            Ok(t) => t.lines().map(str::to_string).collect(),
            Err(_) if std::env::var_os("PARITY_BLESS").is_some() => Vec::new(),
            Err(e) => return Some(format!("{}: no expected file: {}", name, e)),
        }
    } else {
        match build_with_docker(docker, &name, &ctx, &case, &work.join("docker.tar")) {
            Outcome::Built(p) => summary(&read_image(&p), base),
            Outcome::Failed(err) => {
                return match (&ours, case.fails) {
                    (Outcome::Failed(_), true) => None,
                    (Outcome::Failed(_), false) => Some(format!(
                        "{}: docker failed (is the case right?):\n{}",
                        name, err
                    )),
                    (Outcome::Built(_), _) => Some(format!(
                        "{}: docker refused the build but builder built it; docker said:\n{}",
                        name,
                        tail(&err)
                    )),
                };
            }
        }
    };
    let got = match ours {
        Outcome::Built(p) => summary(&read_image(&p), base),
        Outcome::Failed(err) if case.fails => {
            let _ = err;
            return None;
        }
        Outcome::Failed(err) => {
            return Some(format!(
                "{}: builder failed, docker built it:\n{}",
                name,
                tail(&err)
            ))
        }
    };
    if case.fails {
        return Some(format!(
            "{}: the case says the build fails, but it built",
            name
        ));
    }
    if case.golden && std::env::var_os("PARITY_BLESS").is_some() {
        std::fs::write(dir.join("expected"), got.join("\n") + "\n").unwrap();
        return None;
    }
    let (expected, got) = if case.golden {
        (expected, got)
    } else {
        let text = std::fs::read_to_string(ctx.join("Buildfile")).unwrap_or_default();
        without_mount_stubs(expected, got, &text)
    };
    let want: BTreeSet<&String> = expected
        .iter()
        .filter(|l| !ignored(l, &case.ignore))
        .collect();
    let have: BTreeSet<&String> = got.iter().filter(|l| !ignored(l, &case.ignore)).collect();
    if want == have {
        return None;
    }
    let mut report = format!(
        "{}: differs ({}):\n",
        name,
        if case.golden { "golden" } else { "docker" }
    );
    for l in want.difference(&have) {
        report.push_str(&format!("  - {}\n", l));
    }
    for l in have.difference(&want) {
        report.push_str(&format!("  + {}\n", l));
    }
    Some(report)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

#[test]
fn builds_agree_with_docker() {
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/parity");
    // PARITY_DIR: another directory of cases in the same layout (a suite being ported).
    let root = std::env::var_os("PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or(suite.clone());
    let only = std::env::var("PARITY_CASE").ok();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Buildfile").is_file())
        .filter(|p| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|o| p.file_name().unwrap() == o))
        })
        .collect();
    cases.sort();
    if only.is_none() && root == suite {
        assert!(
            cases.len() >= 150,
            "the parity suite has only {} cases",
            cases.len()
        );
    }
    let docker = Docker::start();
    let scratch = tempfile::tempdir().unwrap();
    let store = scratch.path().join("root");
    let base = make_base(&store, &docker, scratch.path());
    let mut failures = Vec::new();
    for dir in &cases {
        if let Some(report) = check_case(dir, &docker, &store, &base, scratch.path()) {
            eprintln!("{}", report);
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} parity cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
