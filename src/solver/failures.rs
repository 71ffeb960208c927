//! A failed RUN's state, kept for `builder debug shell` and `builder debug export`: the
//! layers it ran on, what it wrote (its overlay upper directory, or with the copy
//! snapshotter its whole root), and its op with what its mounts read. The last [`KEPT`]
//! failures are kept; `builder cache prune` removes them all.
//!
//! A debug session runs over that state under the step's own policy: the same spec
//! ([`mounts::step_spec`]), user, working directory, environment, network mode and mounts.
//! It writes to an upper directory of its own, so every session starts from the failed
//! state as the step left it. Secrets are mounted only when the session is given them.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cx::Ctx;
use super::mounts::{self, SecretSource};
use crate::context::{IgnoreMatcher, SourceRoot};
use crate::oci::digest::Digest;
use crate::oci::image::{LayerRef, StoredImage};
use crate::plan::{ExecOp, Input, MountKind, Network};
use crate::store::{Bucket, Store};
use crate::worker::snapshots::{RootView, Snapshots};
use crate::worker::{self, Exit, Snapshotter};

/// How many failed steps' states are kept: the oldest goes when one more fails.
pub const KEPT: usize = 10;

/// What a debug session runs over: a failed step's state, or a stage's final state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebugState {
    /// A failed step's id (empty for a stage's state).
    pub id: String,
    /// When the step failed, in seconds since the epoch.
    pub failed_at: u64,
    /// Where: the build file, line, instruction and stage.
    pub file: String,
    pub line: usize,
    pub instruction: String,
    pub stage: String,
    pub platform: String,
    /// The step: its command, user, working directory, environment, mounts and network.
    pub op: ExecOp,
    /// The layers it ran on, bottom first.
    pub layers: Vec<Value>,
    /// The layers of each stage or image a bind mount reads.
    pub sources: Vec<(Input, Vec<Value>)>,
    /// The build context, and its ignore patterns (a bind of the context sees it as it is
    /// now).
    pub context: PathBuf,
    pub ignore: Vec<String>,
    /// Overlay snapshots (else private copies), and the full process sandbox (else the
    /// relaxed one), as the step ran.
    pub overlay: bool,
    pub process_sandbox: bool,
}

/// Where failed steps are kept.
fn dir_of(store: &Store, id: &str) -> PathBuf {
    store.dir(Bucket::Failures).join(id)
}

/// The directory of a kept state that holds what the failed step wrote.
const WRITTEN: &str = "written";
const STATE_FILE: &str = "state.json";

/// Keep the state of the step `op` that failed in `cx`, having written `written` (which is
/// moved); returns its id.
pub(super) fn keep(
    cx: &Ctx,
    op: &crate::plan::Op,
    exec: &ExecOp,
    written: &Path,
    process_sandbox: bool,
) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let id = Digest::of(
        format!(
            "{}\0{}\0{}\0{}",
            op.cache_key(),
            now.as_nanos(),
            std::process::id(),
            written.display()
        )
        .as_bytes(),
    )
    .hex()[..12]
        .to_string();
    let mut sources = Vec::new();
    for m in exec.mounts.iter().filter(|m| m.kind == MountKind::Bind) {
        if let Some(layers) = cx.layers_of(&m.from) {
            if !sources.iter().any(|(f, _)| f == &m.from) {
                sources.push((
                    m.from.clone(),
                    layers.iter().map(LayerRef::to_json).collect(),
                ));
            }
        }
    }
    let state = DebugState {
        id: id.clone(),
        failed_at: now.as_secs(),
        file: cx.req.file_name.clone(),
        line: op.origin.line,
        instruction: op.origin.text.clone(),
        stage: cx.label.clone(),
        platform: cx.platform.spec(),
        op: exec.clone(),
        layers: cx.layers_below.iter().map(LayerRef::to_json).collect(),
        sources,
        context: cx.req.context.clone(),
        ignore: cx.req.ignore.patterns(),
        overlay: cx.snapshotter == Snapshotter::Overlay,
        process_sandbox,
    };
    let bucket = cx.store.dir(Bucket::Failures);
    fs::create_dir_all(&bucket).map_err(|e| format!("{}: {}", bucket.display(), e))?;
    // Complete or absent: put together beside its place, then renamed into it.
    let staged = tempfile::Builder::new()
        .prefix(".staged-")
        .tempdir_in(&bucket)
        .map_err(|e| format!("{}: {}", bucket.display(), e))?;
    fs::rename(written, staged.path().join(WRITTEN))
        .map_err(|e| format!("{}: {}", written.display(), e))?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    fs::write(staged.path().join(STATE_FILE), json).map_err(|e| e.to_string())?;
    let place = dir_of(cx.store, &id);
    fs::rename(staged.keep(), &place).map_err(|e| format!("{}: {}", place.display(), e))?;
    forget_beyond(cx.store, KEPT);
    Ok(id)
}

/// Every kept failed step, newest first.
pub fn list(store: &Store) -> Vec<DebugState> {
    let mut all: Vec<DebugState> = fs::read_dir(store.dir(Bucket::Failures))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| fs::read(e.path().join(STATE_FILE)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    all.sort_by(|a, b| b.failed_at.cmp(&a.failed_at).then(b.id.cmp(&a.id)));
    all
}

/// Remove all but the newest `n` failed steps.
fn forget_beyond(store: &Store, n: usize) {
    for old in list(store).into_iter().skip(n) {
        let _ = fs::remove_dir_all(dir_of(store, &old.id));
    }
}

/// The failed step `id` (or a unique prefix of it).
pub fn load(store: &Store, id: &str) -> Result<DebugState, String> {
    let mut matching: Vec<DebugState> = list(store)
        .into_iter()
        .filter(|s| !id.is_empty() && s.id.starts_with(id))
        .collect();
    match (matching.pop(), matching.is_empty()) {
        (Some(state), true) => Ok(state),
        (Some(_), false) => Err(format!("{} names more than one failed step", id)),
        (None, _) => Err(format!(
            "no failed step {} is kept (the last {} failures are, until `builder cache prune`)",
            id, KEPT
        )),
    }
}

/// What a failed step wrote, as the state keeps it.
pub fn written_dir(store: &Store, state: &DebugState) -> PathBuf {
    dir_of(store, &state.id).join(WRITTEN)
}

/// A state to open a shell in the final state of `image` (a stage built with `--target`):
/// its config's user, working directory and environment, the default network, no mounts.
pub fn stage_state(image: &StoredImage, stage: &str, context: &Path) -> DebugState {
    let state = &image.state;
    let cwd = state
        .runtime()
        .working_dir()
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    DebugState {
        id: String::new(),
        failed_at: 0,
        file: String::new(),
        line: 0,
        instruction: String::new(),
        stage: stage.to_string(),
        platform: crate::oci::image::platform_of(image),
        op: ExecOp {
            argv: Vec::new(),
            script: None,
            env: state.env(),
            cwd,
            user: state.runtime().user().clone().filter(|u| !u.is_empty()),
            mounts: Vec::new(),
            network: Network::Sandbox,
            insecure: false,
            args: Vec::new(),
            extra_hosts: Vec::new(),
            limits: Default::default(),
        },
        layers: image.state.layers.iter().map(LayerRef::to_json).collect(),
        sources: Vec::new(),
        context: context.to_path_buf(),
        ignore: Vec::new(),
        overlay: true,
        process_sandbox: true,
    }
}

/// How a debug session runs.
pub struct Session<'a> {
    /// The command (default: the image's shell, `/bin/sh`).
    pub argv: Option<Vec<String>>,
    /// `--secret`s given again: the step's secret mounts that are not given are left out.
    pub secrets: BTreeMap<String, SecretSource>,
    /// The command's terminal (see [`worker::RunSpec::terminal`]); `None`: its output
    /// goes to `on_line`.
    pub terminal: Option<RawFd>,
    pub on_line: &'a mut dyn FnMut(&str),
    /// What the user should know (a secret left out).
    pub warn: &'a dyn Fn(&str),
}

/// Run a debug session over `state`; returns how the command ended.
pub fn run(store: &Store, state: &DebugState, session: Session) -> Result<Exit, String> {
    let snaps = snapshots(store);
    let mode = snapshotter(store, state)?;
    let failed = (!state.id.is_empty()).then(|| written_dir(store, state));
    let below = layers(&state.layers)?;
    // With private copies, a failed step's whole root is kept: the view is not needed.
    let below: &[LayerRef] = match (mode, &failed) {
        (Snapshotter::Copy, Some(_)) => &[],
        _ => &below,
    };
    let view = RootView::new(&snaps, mode, below).map_err(|e| e.to_string())?;
    let mut source_views = Vec::new();
    for (from, l) in &state.sources {
        source_views.push((
            from.clone(),
            RootView::new(&snaps, mode, &layers(l)?).map_err(|e| e.to_string())?,
        ));
    }
    let mut op = state.op.clone();
    op.mounts.retain(|m| {
        let given = m.kind != MountKind::Secret
            || m.id
                .as_ref()
                .is_some_and(|id| session.secrets.contains_key(id));
        if !given {
            (session.warn)(&format!(
                "secret {} is not mounted: pass --secret id={},... to mount it again",
                m.id.as_deref().unwrap_or("?"),
                m.id.as_deref().unwrap_or("?")
            ));
        }
        given
    });
    if let Some(argv) = &session.argv {
        op.argv = argv.clone();
    } else {
        op.argv = vec!["/bin/sh".into()];
    }
    let scratch = store.scratch_dir("debug-").map_err(|e| e.to_string())?;
    let cache_mounts = store.dir(Bucket::CacheMounts);
    let context = SourceRoot::context(
        state.context.clone(),
        IgnoreMatcher::new(&state.ignore).map_err(|e| e.to_string())?,
    );
    let rootfs = match (&failed, mode) {
        (Some(root), Snapshotter::Copy) => root.clone(),
        _ => view.path().to_path_buf(),
    };
    let mut lookup = |from: &Input| -> Result<PathBuf, String> {
        source_views
            .iter()
            .find(|(f, _)| f == from)
            .map(|(_, v)| v.path().to_path_buf())
            .ok_or_else(|| format!("{:?} was not kept with the failed step", from))
    };
    let network = mounts::network_mode(op.network);
    let mut guards = mounts::MountGuards::default();
    let setting = mounts::StepSetting {
        rootfs: &rootfs,
        scratch: scratch.path(),
        network,
        insecure: op.insecure,
        process_sandbox: state.process_sandbox,
        executor: worker::sandbox::Executor::Builtin,
        mounts: mounts::MountEnv {
            cache_mounts: &cache_mounts,
            scratch: scratch.path(),
            context: &context,
            named: &BTreeMap::new(),
            ssh: &BTreeMap::new(),
            secrets: &session.secrets,
            from_root: &mut lookup,
            copy_context: false,
        },
    };
    let mut spec = mounts::step_spec(&op, setting, &mut guards)?;
    spec.terminal = session.terminal;
    let step_dir = scratch.path().join("step");
    fs::create_dir_all(&step_dir).map_err(|e| format!("{}: {}", step_dir.display(), e))?;
    let (exit, _) = worker::run_step(
        worker::StepInput {
            view: &view,
            scratch: &step_dir,
            spec,
            in_place: None,
            failed_state: failed.as_deref(),
        },
        session.on_line,
    )
    .map_err(|e| e.to_string())?;
    drop(guards);
    Ok(exit)
}

/// Write the failed state's files (the layers it ran on with what it wrote) to `dest`.
pub fn export(store: &Store, state: &DebugState, dest: &Path) -> Result<(), String> {
    let snaps = snapshots(store);
    let mode = snapshotter(store, state)?;
    let written = written_dir(store, state);
    if mode == Snapshotter::Copy {
        return worker::copy_tree(&written, dest).map_err(|e| e.to_string());
    }
    let mut view =
        RootView::new(&snaps, mode, &layers(&state.layers)?).map_err(|e| e.to_string())?;
    view.lay_over(&written).map_err(|e| e.to_string())?;
    worker::copy_tree(view.path(), dest).map_err(|e| e.to_string())
}

fn snapshots(store: &Store) -> Snapshots {
    Snapshots::new(
        &store.dir(Bucket::Snapshots),
        &store.dir(Bucket::Tmp),
        &store.blobs,
    )
}

/// The snapshotter the state needs: overlay, where it was kept from one, only where
/// overlayfs mounts.
fn snapshotter(store: &Store, state: &DebugState) -> Result<Snapshotter, String> {
    if !state.overlay {
        return Ok(Snapshotter::Copy);
    }
    let probe = store
        .scratch_dir("overlay-probe-")
        .map_err(|e| e.to_string())?;
    match worker::detect(probe.path()) {
        Snapshotter::Overlay => Ok(Snapshotter::Overlay),
        Snapshotter::Copy if state.id.is_empty() => Ok(Snapshotter::Copy),
        Snapshotter::Copy => Err(
            "the failed step ran on overlay snapshots, and overlayfs does not mount here".into(),
        ),
    }
}

fn layers(values: &[Value]) -> Result<Vec<LayerRef>, String> {
    values
        .iter()
        .map(|v| LayerRef::from_json(v).ok_or_else(|| format!("a kept layer is malformed: {}", v)))
        .collect()
}
