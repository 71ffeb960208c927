//! The external executor: the step's OCI runtime spec is handed, as a bundle, to an OCI
//! runtime (`--runtime runc|crun|runsc|PATH`). runc is what BuildKit and buildah use; gVisor's
//! runsc gives VM-grade isolation for untrusted builds.
//!
//! builder mounts the step's root (an overlay of its snapshots) in its own private mount
//! namespace, writes `config.json` beside it, and runs `RUNTIME run --bundle DIR ID` with the
//! output piped. The runtime's own failures are read from its JSON log (`--log`), so they are
//! never mistaken for the command's exit status. Containers that a killed builder left behind
//! are killed and deleted by the next step that uses the same state directory.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::mount::{umount2, MntFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use oci_spec::runtime::Spec;

use super::{network::which, policy, serr, Exit, RootMount, SandboxError};

/// Where the runtime keeps container state (`--root`).
fn state_dir() -> PathBuf {
    PathBuf::from("/run/builder/runtime")
}

/// The runtime binary: a name on PATH, or a path.
pub fn resolve(name: &Path) -> Result<PathBuf, SandboxError> {
    if name.components().count() > 1 {
        return if name.is_file() {
            Ok(name.to_path_buf())
        } else {
            Err(SandboxError(format!(
                "--runtime {}: no such file",
                name.display()
            )))
        };
    }
    let s = name.display().to_string();
    which(&s).ok_or_else(|| {
        SandboxError(format!(
            "--runtime {}: not found on PATH (apt-get install {})",
            s,
            if s == "runsc" { "gvisor" } else { s.as_str() }
        ))
    })
}

/// Mount the overlay root where the runtime will find it (in builder's own private mount
/// namespace). A forked child does it, since the lower dirs are named relative to a
/// directory it must chdir into, and builder's other threads keep their working directory.
fn mount_root(root: &RootMount) -> Result<bool, SandboxError> {
    let RootMount::Overlay {
        lowers,
        upper,
        work,
        merged,
        base,
        scratch,
    } = root
    else {
        return Ok(false);
    };
    // SAFETY: the child only mounts (changing its own directory at most) and exits.
    match unsafe { fork() }.map_err(serr("fork"))? {
        ForkResult::Child => {
            let ok = crate::worker::snapshots::mount_overlay(
                lowers,
                Some((upper, work)),
                merged,
                false,
                false,
                base,
                scratch,
            )
            .is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(true),
            _ => Err(SandboxError(format!(
                "mount the step's overlay on {}",
                merged.display()
            ))),
        },
    }
}

/// Runs `RUNTIME ARGS...` (`$1`, then `$4...`) in the background and exits with its status;
/// on SIGHUP or SIGTERM (builder died) kills and deletes container `$3` of state `$2` first.
const WATCHMAN: &str = r#"rt=$1 state=$2 id=$3
shift 3
trap '"$rt" --root "$state" kill --all "$id" KILL >/dev/null 2>&1; "$rt" --root "$state" delete --force "$id" >/dev/null 2>&1; exit 137' HUP TERM
"$rt" "$@" &
wait $!"#;

/// Kill and delete containers whose builder process is gone (ids are `builder-PID-N`).
fn reap_stale(binary: &Path, state: &Path) {
    let Ok(rd) = fs::read_dir(state) else { return };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = id
            .strip_prefix("builder-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if crate::oci::blobs::process_exists(pid) {
            continue;
        }
        let runtime = |args: &[&str]| {
            let _ = Command::new(binary)
                .arg("--root")
                .arg(state)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        runtime(&["kill", "--all", &id, "KILL"]);
        runtime(&["delete", "--force", &id]);
    }
}

/// The runtime's own error, from its JSON log.
fn runtime_error(log: &Path) -> Option<String> {
    let f = fs::File::open(log).ok()?;
    let mut last = None;
    for line in BufReader::new(f).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if matches!(v["level"].as_str(), Some("error" | "fatal")) {
            last = v["msg"].as_str().map(str::to_string);
        }
    }
    last
}

/// Run `spec` with the OCI runtime `binary`.
pub fn run(
    binary: &Path,
    spec: &Spec,
    root: &RootMount,
    on_line: &mut dyn FnMut(&str),
) -> Result<Exit, SandboxError> {
    if crate::worker::rootless() {
        return Err(SandboxError(
            "--runtime needs builder to run as root (rootless builds use the built-in executor)"
                .into(),
        ));
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let binary = resolve(binary)?;
    let state = state_dir();
    fs::create_dir_all(&state).map_err(|e| SandboxError(format!("{}: {}", state.display(), e)))?;
    reap_stale(&binary, &state);
    let target = root.target();
    let bundle = target
        .parent()
        .map(|p| p.join("bundle"))
        .ok_or_else(|| SandboxError(format!("{}: no parent directory", target.display())))?;
    fs::create_dir_all(&bundle)
        .map_err(|e| SandboxError(format!("{}: {}", bundle.display(), e)))?;
    let config = policy::to_json(spec).map_err(|e| SandboxError(e.to_string()))?;
    fs::write(bundle.join("config.json"), config)
        .map_err(|e| SandboxError(format!("{}: {}", bundle.display(), e)))?;
    let log = bundle.join("runtime.log");
    let id = format!(
        "builder-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mounted = mount_root(root)?;
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
    let out_w2 = out_w.try_clone().map_err(serr("pipe"))?;
    // The runtime runs under a watchman shell that builder's death reaches as SIGHUP: it
    // kills and deletes the container then (the runtime's own death would orphan it).
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(WATCHMAN)
        .arg("builder-runtime")
        .arg(&binary)
        .arg(&state)
        .arg(&id)
        .arg("--root")
        .arg(&state)
        .arg("--log")
        .arg(&log)
        .arg("--log-format")
        .arg("json")
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(out_w2));
    // SAFETY: only prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP);
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(cmd);
    let result = spawned
        .map_err(|e| SandboxError(format!("start {}: {}", binary.display(), e)))
        .and_then(|mut child| {
            super::pump_lines(fs::File::from(out_r), on_line);
            let status = child.wait().map_err(serr("wait"))?;
            if let Some(e) = runtime_error(&log) {
                return Err(SandboxError(format!("{}: {}", binary.display(), e)));
            }
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(c), _) => Ok(Exit::Code(c)),
                (None, Some(s)) => Ok(Exit::Signal(s)),
                _ => Err(SandboxError("the runtime ended without a status".into())),
            }
        });
    if mounted {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
    result
}
