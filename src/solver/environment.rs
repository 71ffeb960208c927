//! Where RUN steps run: the [`Worker`] seam between the solver and the host, and the host's
//! worker. Entering a build sets the host up once (snapshotter, user and mount namespaces,
//! or `--isolation container`'s checks); each RUN then goes to [`Worker::run_step`]. Unit
//! tests of the solver put a fake worker here and need neither root nor namespaces.

use std::fs;
use std::path::{Path, PathBuf};

use super::{BuildError, BuildRequest, Entitlements};
use crate::store::{Bucket, Store, StoreFile};
use crate::worker::{self, Exit, Snapshotter};

/// What runs a build's RUN steps.
pub trait Worker: Sync {
    /// Set the build up where it runs; called once per build, before any stage.
    fn enter(&self, store: &Store, req: &BuildRequest) -> Result<Environment, BuildError>;

    /// Whether a step gets its own PID namespace and /proc here (else the relaxed sandbox),
    /// probed at the build's first RUN.
    fn probe_process_sandbox(&self, scratch: &Path) -> Result<bool, String>;

    /// Run one step; returns its exit and its diff directory (overlay upper format).
    fn run_step(
        &self,
        input: worker::StepInput,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(Exit, PathBuf), worker::WorkerError>;

    /// What the last steps had to say to the user (a path a layout left alone).
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }
}

/// How a build's steps run here, as [`Worker::enter`] found it.
pub struct Environment {
    pub snapshotter: Snapshotter,
    /// Why RUN cannot be sandboxed here (no namespace could be made), if so.
    pub sandbox_unavailable: Option<String>,
    /// `--isolation container`: what a step's layout never touches.
    pub kept: Option<worker::inplace::Kept>,
}

/// The host's worker: builder's sandbox, or the container itself.
pub struct HostWorker;

impl Worker for HostWorker {
    fn enter(&self, store: &Store, req: &BuildRequest) -> Result<Environment, BuildError> {
        let kept = match req.isolation {
            worker::Isolation::Container => Some(container_isolation(store, req)?),
            worker::Isolation::Sandbox => None,
        };
        let (snapshotter, sandbox_unavailable) = choose_snapshotter(store, req)?;
        Ok(Environment {
            snapshotter,
            sandbox_unavailable,
            kept,
        })
    }

    fn probe_process_sandbox(&self, scratch: &Path) -> Result<bool, String> {
        worker::sandbox::probe_process_sandbox(scratch)
    }

    fn run_step(
        &self,
        input: worker::StepInput,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(Exit, PathBuf), worker::WorkerError> {
        if !is_root() {
            return Err(worker::sandbox::SandboxError(
                "RUN needs root or an unprivileged user namespace, and neither is available here (see the warning above)".into(),
            )
            .into());
        }
        worker::run_step(input, on_line)
    }

    fn notices(&self) -> Vec<String> {
        worker::inplace::take_notices()
    }
}

/// Set up this process for a debug session as a build's steps are: its own user namespace
/// without root, and its own mount namespace.
pub fn enter_debug_host() -> Result<(), String> {
    if !is_root() {
        worker::enter_user_namespace()
            .map_err(|e| format!("no user namespace can be made here ({})", e))?;
    }
    worker::snapshots::enter_private_mount_namespace()
        .map_err(|e| format!("no mount namespace can be made here ({})", e))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Overlay snapshots where overlayfs mounts; otherwise private copies. Builder first moves
/// into its own mount namespace (and, without root, its own user namespace) so its views die
/// with it.
fn choose_snapshotter(
    store: &Store,
    req: &BuildRequest,
) -> Result<(Snapshotter, Option<String>), BuildError> {
    let reporter = req.reporter;
    if req.isolation == worker::Isolation::Container {
        // The container is the sandbox: no namespace, no mount, views are private copies.
        return Ok((Snapshotter::Copy, None));
    }
    if !is_root() {
        // Rootless: become root of our own user namespace, then proceed as root does.
        match worker::enter_user_namespace() {
            Err(e) => {
                return Ok((
                    Snapshotter::Copy,
                    Some(format!("no user namespace can be made here ({})", e)),
                ));
            }
            Ok(Some(reason)) => reporter.warn(&format!(
                "rootless mode with only your own uid mapped ({}): RUN sees every file as root's, and chown or USER to another id fails; to map every id, {}",
                reason,
                worker::RANGE_HINT
            )),
            Ok(None) => {}
        }
    }
    if let Err(e) = worker::snapshots::enter_private_mount_namespace() {
        // FROM, COPY and ADD need no namespace: only RUN will fail, and say what to do.
        return Ok((
            Snapshotter::Copy,
            Some(format!("no mount namespace can be made here ({})", e)),
        ));
    }
    // Whether overlayfs mounts here only changes with the kernel or the store's filesystem:
    // a success is remembered for this boot and device, and the probe (a process that
    // mounts) is not run again.
    let seen_key = overlay_probe_key(store);
    let seen_path = store.file(StoreFile::OverlayProbe);
    if std::env::var("BUILDER_SNAPSHOTTER").as_deref() != Ok("copy")
        && seen_key
            .as_ref()
            .is_some_and(|k| fs::read_to_string(&seen_path).is_ok_and(|s| &s == k))
    {
        return Ok((Snapshotter::Overlay, None));
    }
    let probe = store.scratch_dir("overlay-probe-")?;
    let s = worker::detect(probe.path());
    if let (Snapshotter::Overlay, Some(key)) = (s, &seen_key) {
        let _ = crate::oci::blobs::replace_unsynced(&seen_path, key.as_bytes());
    }
    if s == Snapshotter::Copy {
        reporter.warn("overlayfs is not available here: using the copy snapshotter (each RUN copies the root filesystem)");
    }
    Ok((s, None))
}

/// `--isolation container`: refused unless this is a container (or the override says so),
/// since a step's layout rewrites `/`; then what it keeps.
fn container_isolation(
    store: &Store,
    req: &BuildRequest,
) -> Result<worker::inplace::Kept, BuildError> {
    if !matches!(req.executor, worker::sandbox::Executor::Builtin) {
        return Err(BuildError::Other(
            "--runtime cannot be used with --isolation container (the container runs the steps)"
                .into(),
        ));
    }
    if req.entitlements != Entitlements::default() {
        return Err(BuildError::Other(
            "--allow cannot be enforced under --isolation container: the container's own privileges and network apply to every step".into(),
        ));
    }
    if !is_root() {
        return Err(BuildError::Other(
            "--isolation container needs root in the container (each step's root filesystem is laid out in the container's own /); run the container as root, or use the default --isolation sandbox with subordinate ranges and seccomp unconfined".into(),
        ));
    }
    let forced = std::env::var_os(worker::inplace::FORCE_ENV).is_some_and(|v| v == "1");
    match worker::inplace::detect_container() {
        Some(_) => {}
        None if forced => req.reporter.warn(&format!(
            "--isolation container on what does not look like a container ({}=1): RUN steps rewrite this machine's root filesystem",
            worker::inplace::FORCE_ENV
        )),
        None => {
            return Err(BuildError::Other(format!(
                "--isolation container runs steps in this machine's own root filesystem, so it only runs inside a container (none detected: no /.dockerenv, /run/.containerenv, $container or Kubernetes service account). Use the default --isolation sandbox here, or set {}=1 in a disposable container builder cannot recognise",
                worker::inplace::FORCE_ENV
            )))
        }
    }
    // What builder puts in temporary directories (an ADDed archive being extracted, a
    // secret) must not be in the way of a step's layout: under the store, which is kept.
    let tmp = store.dir(Bucket::Tmp);
    fs::create_dir_all(&tmp).map_err(|e| BuildError::Other(format!("{}: {}", tmp.display(), e)))?;
    std::env::set_var("TMPDIR", &tmp);
    let mut keep = req.keep.clone();
    keep.push(store.root().to_path_buf());
    keep.push(req.context.clone());
    // What a push after the build reads: credentials and builder's own configuration.
    keep.push(crate::registry::auth::auth_file());
    keep.push(crate::registry::auth::config_dir());
    Ok(worker::inplace::Kept::discover(&keep))
}

/// What an overlay probe's success is remembered by: this boot, and the store's device.
fn overlay_probe_key(store: &Store) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let dev = fs::metadata(store.root()).ok()?.dev();
    Some(format!("{} {}\n", boot.trim(), dev))
}
