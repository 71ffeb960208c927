//! Debugging a failed step: its state is kept, `builder debug shell ID` opens a shell in it
//! (or runs one command) under the step's own sandbox, through a pty when interactive;
//! `--on-error=shell` opens it at once, `debug shell --target` opens a stage's final state,
//! `debug export` writes the failed state's files, and `cache prune` forgets it all.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::*;

/// A step that writes to its working directory, a cache mount and /tmp as `app`, then fails.
const FAILING: &str = "FROM busybox:test AS base\n\
    RUN mkdir -p /work /home/app && busybox chown 1000:1000 /work /home/app && echo base > /stage-mark\n\
    FROM base\n\
    WORKDIR /work\n\
    USER app\n\
    ENV FLAVOR=spicy\n\
    RUN --mount=type=cache,target=/cache,uid=1000 echo \"cached-$((1+1))\" > /cache/c && echo \"partial-$((2+1))\" > /work/p && exit 9\n";

struct Failed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ctx: PathBuf,
    id: String,
}

/// Build `buildfile` (with `probe` in its context), which must fail; returns the failure id
/// its error names, and the log.
fn fail_build(buildfile: &str) -> (Failed, String) {
    let dir = busybox_dir();
    let root = dir.path().join("root");
    let ctx = dir.path().join("ctx");
    write(&ctx.join("Buildfile"), buildfile);
    std::fs::copy(probe_binary(dir.path()), ctx.join("probe")).unwrap();
    let out = run(builder()
        .args(["build", "--progress", "plain", "--root"])
        .arg(&root)
        .arg(&ctx));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{log}");
    let last = log.lines().last().unwrap_or_default();
    let id = last
        .split("builder debug shell")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().last())
        .unwrap_or_else(|| panic!("the error ends with builder debug shell ID: {log}"))
        .to_string();
    assert!(
        last.contains("--root"),
        "a store that is not the default is named: {last}"
    );
    (
        Failed {
            _dir: dir,
            root,
            ctx,
            id,
        },
        log,
    )
}

/// `builder debug SUB --root ROOT ARGS...`.
fn debug(f: &Failed, args: &[&str]) -> std::process::Output {
    run(builder()
        .args(["debug", args[0], "--root"])
        .arg(&f.root)
        .args(&args[1..]))
}

#[test]
fn a_command_in_a_failed_step_sees_its_writes_user_workdir_and_cache() {
    let (f, _) = fail_build(FAILING);
    let out = debug(
        &f,
        &[
            "shell",
            &f.id,
            "--",
            "sh",
            "-c",
            "cat /work/p /cache/c; id -u; pwd; echo \"flavor=$FLAVOR home=$HOME\"",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "partial-3",
            "cached-2",
            "1000",
            "/work",
            "flavor=spicy home=/home/app"
        ]
    );
    // The command's exit is the session's.
    let out = debug(&f, &["shell", &f.id, "--", "sh", "-c", "exit 6"]);
    assert_eq!(out.status.code(), Some(6));
    // Every session starts from the state the step left.
    let out = debug(&f, &["shell", &f.id, "--", "sh", "-c", "rm /work/p"]);
    assert!(out.status.success());
    let out = debug(&f, &["shell", &f.id, "--", "cat", "/work/p"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "partial-3\n");

    // Its files, exported.
    let dest = f.ctx.parent().unwrap().join("exported");
    let out = debug(
        &f,
        &[
            "export",
            &f.id,
            "-o",
            &format!("type=local,dest={}", dest.display()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("work/p")).unwrap(),
        "partial-3\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("stage-mark")).unwrap(),
        "base\n"
    );
    assert!(dest.join("bin/busybox").is_file());

    // A stage's final state.
    let out = run(builder()
        .args(["debug", "shell", "--target", "base", "--context"])
        .arg(&f.ctx)
        .arg("--root")
        .arg(&f.root)
        .args(["--", "cat", "/stage-mark"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "base\n");

    // A prune forgets failed steps.
    let out = run(builder().args(["cache", "prune", "--root"]).arg(&f.root));
    assert!(out.status.success());
    let out = debug(&f, &["shell", &f.id, "--", "true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no failed step {}", f.id)), "{err}");
}

/// The step's output lines of the probe and of its status (`#N CHECK ...`).
fn step_lines(log: &str, prefix: &[&str]) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix('#')?.split_once(' ').map(|(_, rest)| rest))
        .filter(|rest| prefix.iter().any(|p| rest.starts_with(p)))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_session_sees_no_more_than_its_step_could() {
    let host_secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host_secret.path(), "host-only").unwrap();
    let check = format!(
        "/probe 1 /ctx; busybox grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs)' /proc/self/status; cat {} || echo \"host file: $((0+0)) none\"",
        host_secret.path().display()
    );
    let (f, log) = fail_build(&format!(
        "FROM busybox:test\nCOPY probe /probe\nRUN --mount=type=bind,target=/ctx {}; exit 3\n",
        check
    ));
    let prefixes = [
        "CHECK ",
        "CapEff",
        "CapBnd",
        "Seccomp",
        "NoNewPrivs",
        "host file",
        "host-only",
    ];
    let in_step = step_lines(&log, &prefixes);
    assert!(in_step.iter().any(|l| l.starts_with("CHECK")), "{log}");
    assert!(
        !in_step
            .iter()
            .any(|l| l.contains("ESCAPED") || l.contains("host-only")),
        "{in_step:?}"
    );
    let out = debug(&f, &["shell", &f.id, "--", "sh", "-c", &check]);
    let session: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .map(str::to_string)
        .collect();
    assert_eq!(
        session, in_step,
        "the same policy in the step and the session"
    );
}

/// Run `cmd` on a new pty, typing `input` at the shell's first prompt (a shell with line
/// editing flushes what was typed before it started); returns what the terminal showed and
/// the exit.
fn on_pty(cmd: &mut Command, input: &str) -> (String, ExitStatus) {
    let (mut child, mut master) = spawn_on_pty(cmd, 80, None);
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once every copy of the terminal end is closed.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut shown = Vec::new();
    let mut typed = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(chunk) => shown.extend(chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!(
                "the session did not end: {e}: {}",
                String::from_utf8_lossy(&shown)
            ),
        }
        if !typed && String::from_utf8_lossy(&shown).contains("$ ") {
            master.write_all(input.as_bytes()).unwrap();
            typed = true;
        }
    }
    let status = child.wait().unwrap();
    (String::from_utf8_lossy(&shown).into_owned(), status)
}

#[test]
fn an_interactive_shell_runs_on_a_terminal() {
    let (f, _) = fail_build(FAILING);
    let (shown, status) = on_pty(
        builder()
            .args(["debug", "shell", &f.id, "--root"])
            .arg(&f.root),
        "[ -t 0 ] && echo \"tty=$((1+0))\"; echo \"in=$(cat /work/p) as $(id -u) in $PWD\"; exit 5\n",
    );
    assert!(shown.contains("tty=1"), "the shell has a terminal: {shown}");
    assert!(shown.contains("in=partial-3 as 1000 in /work"), "{shown}");
    assert_eq!(status.code(), Some(5), "{shown}");

    // --on-error=shell opens it as the build fails, then fails the build.
    let (shown, status) = on_pty(
        builder()
            .args(["build", "--progress", "plain", "--on-error=shell", "--root"])
            .arg(&f.root)
            .arg(&f.ctx),
        "echo \"again=$(cat /work/p)\"; exit 0\n",
    );
    assert!(shown.contains("again=partial-3"), "{shown}");
    assert!(shown.contains("exit code 9"), "{shown}");
    assert!(!status.success());
}
