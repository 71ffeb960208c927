//! Git sources, against a `git daemon` on loopback started by the test: `ADD git://…#ref`
//! and `#ref:subdir`, the commit in the key and the provenance, one digest per commit,
//! `--keep-git-dir`, mtimes from the commit clamped by the epoch, and `--build-context
//! NAME=git://…`.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// 2021-01-01T00:00:00Z: the time of every commit the test makes.
const COMMIT_TIME: i64 = 1_609_459_200;

struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    run_ok(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .env("GIT_AUTHOR_DATE", "2021-01-01T00:00:00Z")
            .env("GIT_COMMITTER_DATE", "2021-01-01T00:00:00Z"),
    )
    .trim()
    .to_string()
}

/// A repository served at `git://127.0.0.1:PORT/repo.git`: tag v1 has a.txt "one", a
/// subdirectory and an executable; main moves on with a.txt "two".
fn served_repo(dir: &Path) -> (Daemon, PathBuf) {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    write(&work.join("a.txt"), "one\n");
    write(&work.join("sub/b.txt"), "bee\n");
    write(&work.join("run.sh"), "#!/bin/sh\necho hi\n");
    std::fs::set_permissions(work.join("run.sh"), std::fs::Permissions::from_mode(0o775)).unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    git(&work, &["tag", "v1"]);
    write(&work.join("a.txt"), "two\n");
    git(&work, &["commit", "-q", "-am", "two"]);
    let served = dir.join("served");
    std::fs::create_dir_all(&served).unwrap();
    run_ok(
        Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(served.join("repo.git")),
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("git")
        .arg("daemon")
        .arg("--reuseaddr")
        .arg("--export-all")
        .arg("--listen=127.0.0.1")
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", served.display()))
        .arg(&served)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git is not installed: run .ci/run");
    let url = format!("git://127.0.0.1:{port}/repo.git");
    let daemon = Daemon { child, url };
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (daemon, work)
}

#[test]
fn add_of_a_git_ref_is_the_commits_tree_keyed_by_the_commit() {
    let d = tempfile::tempdir().unwrap();
    let (daemon, work) = served_repo(d.path());
    let url = &daemon.url;
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        &format!("FROM scratch\nADD {url}#v1 /src\nADD {url}#main:sub /sub\n"),
    );
    let out = d.path().join("out");
    let root = d.path().join("root");
    let build_into = |root: &Path, epoch: &str| {
        run_ok(
            build_cmd(root)
                .args(["--source-date-epoch", epoch])
                .args(["-o", &format!("local:{}", out.display())])
                .arg(&ctx),
        )
    };
    let first = build_into(&root, "2000000000");
    assert_eq!(
        std::fs::read_to_string(out.join("src/a.txt")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sub/b.txt")).unwrap(),
        "bee\n"
    );
    assert!(
        !out.join("src/.git").exists(),
        "no .git without --keep-git-dir"
    );
    let exec = std::fs::metadata(out.join("src/run.sh")).unwrap();
    assert_eq!(exec.mode() & 0o777, 0o755, "git's executable mode");
    assert_eq!(
        std::fs::metadata(out.join("src/a.txt")).unwrap().mode() & 0o777,
        0o644
    );
    assert_eq!(exec.mtime(), COMMIT_TIME, "mtimes are the commit's");

    // The commit is in the provenance.
    let v1 = git(&work, &["rev-parse", "v1"]);
    let prov = std::fs::read_to_string(out.join("provenance.json")).unwrap();
    assert!(prov.contains(&v1), "{prov}");

    // Another store, another machine: the same digest.
    let other = build_into(&d.path().join("root2"), "2000000000");
    assert_eq!(first.trim(), other.trim());

    // main moves: the step of main reruns, the tag's stays cached, the image changes.
    write(&work.join("sub/b.txt"), "moved\n");
    git(&work, &["commit", "-q", "-am", "three"]);
    run_ok(
        Command::new("git")
            .args(["push", "-q"])
            .arg(d.path().join("served/repo.git"))
            .arg("main")
            .current_dir(&work),
    );
    let moved = build_into(&root, "2000000000");
    assert_ne!(first.trim(), moved.trim());
    assert_eq!(
        std::fs::read_to_string(out.join("sub/b.txt")).unwrap(),
        "moved\n"
    );

    // An epoch before the commit clamps the mtimes.
    build_into(&root, "1000");
    assert_eq!(
        std::fs::metadata(out.join("src/a.txt")).unwrap().mtime(),
        1000
    );

    // --keep-git-dir keeps .git; a ref that does not exist is named.
    write(
        &ctx.join("Buildfile"),
        &format!("FROM scratch\nADD --keep-git-dir {url}#v1 /src\n"),
    );
    build_into(&root, "2000000000");
    assert!(out.join("src/.git").is_dir());
    write(
        &ctx.join("Buildfile"),
        &format!("FROM scratch\nADD {url}#nope /src\n"),
    );
    let bad = run(build_cmd(&root).arg(&ctx));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("nope") && err.contains("Buildfile:2"), "{err}");
}

#[test]
fn a_git_build_context_is_read_like_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let (daemon, work) = served_repo(d.path());
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nCOPY --from=src a.txt /a.txt\nCOPY --from=src sub /sub\n",
    );
    let out = d.path().join("out");
    run_ok(
        build_cmd(&d.path().join("root"))
            .args(["--build-context", &format!("src={}#v1", daemon.url)])
            .args(["-o", &format!("local:{}", out.display())])
            .arg(&ctx),
    );
    assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "one\n");
    assert_eq!(
        std::fs::read_to_string(out.join("sub/b.txt")).unwrap(),
        "bee\n"
    );
    let prov = std::fs::read_to_string(out.join("provenance.json")).unwrap();
    let v1 = git(&work, &["rev-parse", "v1"]);
    assert!(
        prov.contains(&v1),
        "the context's commit is recorded: {prov}"
    );
}
