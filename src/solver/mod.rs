//! The solver: runs the build graph's stages (concurrently where they are independent),
//! applies each instruction to an [`ImageState`], asks the cache before every layer-producing
//! step, writes the layers COPY, ADD, WORKDIR and RUN produce, and commits the target stage as
//! an image. A stage's filesystem is a [`RootView`] of shared layer snapshots, created only
//! when a step has to read it.

pub mod copy;
mod history;
pub mod run;
pub mod users;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use crate::attest::trace::{BuildTrace, StepTrace};
use crate::cache::context_hash::ContextHasher;
use crate::cache::remote::RemoteCache;
use crate::cache::{CacheIndex, CacheKey};
use crate::context::SourceRoot;
use crate::oci::digest::Digest;
use crate::oci::image::{rfc3339, ImageState, LayerRef, StoredImage};
use crate::oci::layer::{Compression, LayerOptions};
use crate::oci::unpack;
use crate::plan::{Base, BuildGraph, Platform, Scope};
use crate::progress::Reporter;
use crate::registry::{Client, PullPolicy};
use crate::store::{sources, Store, StoreError};
use crate::syntax::dockerignore::{clean_path, IgnoreMatcher};
use crate::syntax::instruction::{Command, Healthcheck, Network};
use crate::syntax::{Instruction, Located, Span};
use crate::worker::snapshots::{RootView, Snapshots};
use crate::worker::{self, Exit, Snapshotter};

/// Everything a build needs besides the store.
#[derive(Clone)]
pub struct BuildRequest<'a> {
    pub file_name: String,
    pub source: String,
    pub escape: char,
    pub graph: BuildGraph,
    pub context: PathBuf,
    pub ignore: IgnoreMatcher,
    pub build_args: BTreeMap<String, String>,
    pub epoch: i64,
    pub compression: Compression,
    pub platform: Platform,
    pub reporter: &'a dyn Reporter,
    /// The default network for RUN (`--network`).
    pub network: Network,
    /// What the build may weaken in the sandbox (`--allow`).
    pub entitlements: Entitlements,
    /// Who runs RUN steps (`--runtime`).
    pub executor: worker::sandbox::Executor,
    /// `--secret` sources by id.
    pub secrets: BTreeMap<String, run::SecretSource>,
    /// `--no-cache`: run every step.
    pub no_cache: bool,
    /// `--no-cache-filter`: stages (names or indexes) whose steps all run.
    pub no_cache_filter: Vec<String>,
    /// Parallelism for stages and for hashing.
    pub jobs: usize,
    /// When FROM and --from pull named images from their registry.
    pub pull: PullPolicy,
    pub registry: Arc<Client>,
    /// Caches imported with `--cache-from`, asked when the local cache misses.
    pub cache_from: Vec<Arc<RemoteCache>>,
    /// Name the platform in progress lines (one build of several platforms).
    pub show_platform: bool,
}

/// BuildKit's entitlements: what a build may do that weakens the RUN sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entitlements {
    /// `--allow network.host`: `--network=host` for the build or a step.
    pub network_host: bool,
    /// `--allow security.insecure`: `RUN --security=insecure`.
    pub security_insecure: bool,
}

impl Entitlements {
    /// Parse `--allow` values.
    pub fn parse(values: &[String]) -> Result<Entitlements, String> {
        let mut e = Entitlements::default();
        for v in values.iter().flat_map(|v| v.split(',')) {
            match v.trim() {
                "network.host" => e.network_host = true,
                "security.insecure" => e.security_insecure = true,
                other => {
                    return Err(format!(
                        "unknown entitlement {:?} (network.host or security.insecure)",
                        other
                    ))
                }
            }
        }
        Ok(e)
    }
}

pub use crate::cache::StepRecord;

/// A failed build, located at the build file line of the failing step when there is one.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Step(Box<StepFailure>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

impl BuildError {
    /// What the user can do about it, when something can be said.
    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Step(f) => f.hint.clone(),
            BuildError::Store(e) => e.hint(),
            BuildError::Other(_) => None,
        }
    }
}

/// Where and why a step failed.
#[derive(Debug)]
pub struct StepFailure {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub step: String,
    pub text: String,
    pub msg: String,
    pub source_line: String,
    /// What the user can do about it, when something can be said.
    pub hint: Option<String>,
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: step {} {}: {}{}",
            self.file,
            self.line,
            self.column,
            self.step,
            crate::syntax::error::abbreviate(&self.text, 120),
            crate::syntax::error::abbreviate(&self.msg, 4000),
            caret(&self.source_line, self.column)
        )
    }
}

/// `FROM scratch` as BuildKit makes it: working directory `/` and the default PATH (not on
/// Windows, which sets its own).
fn scratch_base(os: &str, arch: &str, variant: Option<&str>) -> ImageState {
    let mut state = ImageState::scratch(os, arch, variant);
    state.with_runtime(|c| {
        c.set_working_dir(Some("/".into()));
    });
    if os != "windows" {
        state.set_env("PATH", crate::oci::image::DEFAULT_PATH);
    }
    state
}

/// Chain the metadata steps applied since the last key (their texts, and the config they
/// left) into `key`; nothing when there were none.
fn key_metadata(key: CacheKey, pending: &mut Vec<String>, state: &ImageState) -> CacheKey {
    if pending.is_empty() {
        return key;
    }
    // The key before already covers the history; the texts and the settings they left
    // cover what these steps did.
    let settings = Digest::of(&state.settings_json());
    let texts = std::mem::take(pending);
    CacheKey::chain(
        &key,
        json!({"texts": texts, "settings": settings.to_string()}),
    )
}

/// The offending line and a caret under `column`, as syntax errors show them.
fn caret(line: &str, column: usize) -> String {
    if line.is_empty() {
        return String::new();
    }
    let (shown, caret) = crate::syntax::error::window(line, column);
    format!("\n  {}\n  {}^", shown, " ".repeat(caret))
}

struct StageResult {
    state: ImageState,
    /// The key of the stage's last step: what `COPY --from` and `FROM <stage>` key on.
    key: CacheKey,
    view: Option<RootView>,
    /// The ARG values in scope at the stage's end: a stage built on it sees them (BuildKit
    /// keeps them in the state's environment), though neither its config nor its history
    /// shows them.
    args: BTreeMap<String, Option<String>>,
    /// See `Ctx::volatile`.
    volatile: bool,
}

/// Keys of steps running right now in this process, whichever build runs them (the
/// platforms of one build run side by side): an identical step elsewhere waits, then hits.
static INFLIGHT: std::sync::LazyLock<(Mutex<std::collections::BTreeSet<String>>, Condvar)> =
    std::sync::LazyLock::new(Default::default);

/// What all stages of one build share (stages run on their own threads).
struct Shared<'a> {
    store: &'a Store,
    req: &'a BuildRequest<'a>,
    results: Mutex<BTreeMap<usize, StageResult>>,
    created: String,
    /// Steps started so far (the `#N` of progress lines).
    counter: AtomicUsize,
    total: AtomicUsize,
    /// Images named by `--from` that are not stages: fetched once, viewed when read.
    external: Mutex<BTreeMap<String, ExternalImage>>,
    snapshotter: Snapshotter,
    snaps: Snapshots,
    cache: CacheIndex,
    hasher: ContextHasher,
    /// Layered steps with their keys, as they complete.
    steps: Mutex<Vec<StepRecord>>,
    /// What the build read and did, for provenance.
    trace: Mutex<BuildTrace>,
}

/// An image a `--from` names.
struct ExternalImage {
    image: StoredImage,
    view: Option<RootView>,
}

/// One stage's view of the build: the shared parts plus the step it is on.
struct Ctx<'s, 'a> {
    sh: &'s Shared<'a>,
    step: usize,
    /// The platform this stage builds for: its `FROM --platform`, else the build's.
    platform: Platform,
    /// What the current step read, for its provenance record.
    inputs: Vec<Value>,
    /// Whether this stage's key chain holds a key that never repeats (an ADD of a URL
    /// without `--checksum`): provenance then leaves the keys out, as they say nothing.
    volatile: bool,
}

impl<'a> std::ops::Deref for Ctx<'_, 'a> {
    type Target = Shared<'a>;
    fn deref(&self) -> &Shared<'a> {
        self.sh
    }
}

/// Which stages are done, how many run, and the first failure.
#[derive(Default)]
struct Schedule {
    /// Stages whose inputs are all done, in build order.
    ready: std::collections::VecDeque<usize>,
    /// For each stage, how many of its inputs are not done yet.
    waiting: BTreeMap<usize, usize>,
    /// For each stage, the stages that read it.
    dependents: BTreeMap<usize, Vec<usize>>,
    /// Stages not finished yet.
    left: usize,
    failed: Option<BuildError>,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Overlay snapshots where overlayfs mounts; otherwise private copies. Builder first moves
/// into its own mount namespace (and, without root, its own user namespace) so its views die
/// with it.
fn choose_snapshotter(store: &Store, reporter: &dyn Reporter) -> Result<Snapshotter, BuildError> {
    if !is_root() {
        // Rootless: become root of our own user namespace, then proceed as root does.
        if let Err(e) = worker::enter_user_namespace() {
            reporter.warn(&format!("rootless mode is not available here ({}): RUN cannot run and layers are unpacked by copy", e));
            return Ok(Snapshotter::Copy);
        }
        reporter.warn("rootless mode: running in a user namespace where only your uid is mapped (files are owned by root in the image; USER with other ids cannot run)");
    }
    worker::snapshots::enter_private_mount_namespace()
        .map_err(|e| BuildError::Other(e.to_string()))?;
    let probe = store.scratch_dir("overlay-probe-")?;
    let s = worker::detect(probe.path());
    if s == Snapshotter::Copy {
        reporter.warn("overlayfs is not available here: using the copy snapshotter (each RUN copies the root filesystem)");
    }
    Ok(s)
}

/// Build the graph's target; returns the committed image.
pub fn build(store: &Store, req: &BuildRequest) -> Result<StoredImage, BuildError> {
    build_recorded(store, req).map(|o| o.image)
}

/// What a build made, and how.
pub struct Outcome {
    pub image: StoredImage,
    /// The cache keys of its steps (what `--cache-to` exports).
    pub steps: Vec<StepRecord>,
    /// What it read and did, for provenance.
    pub trace: BuildTrace,
}

/// Build the graph's target; returns the committed image, the cache keys of its steps and
/// its trace.
pub fn build_recorded(store: &Store, req: &BuildRequest) -> Result<Outcome, BuildError> {
    let total = req
        .graph
        .order
        .iter()
        .map(|&i| req.graph.stages[i].instructions.len() + 1)
        .sum();
    // Held for the whole build so `cache prune` never removes what this build is writing.
    let _lease = crate::cache::gc::build_lease(store)?;
    let snapshotter = choose_snapshotter(store, req.reporter)?;
    let shared = Shared {
        store,
        req,
        results: Mutex::new(BTreeMap::new()),
        created: rfc3339(req.epoch),
        counter: AtomicUsize::new(0),
        total: AtomicUsize::new(total),
        external: Mutex::new(BTreeMap::new()),
        snapshotter,
        snaps: Snapshots::new(store.root(), &store.blobs),
        cache: CacheIndex::new(store.root(), &store.blobs).with_remotes(req.cache_from.clone()),
        hasher: ContextHasher::open(store.root(), req.jobs),
        steps: Mutex::new(Vec::new()),
        trace: Mutex::new(BuildTrace::default()),
    };
    // Stages run as soon as the stages they read are done, on at most `jobs` worker threads
    // that take ready stages from a queue (a thread per stage would wake every waiting stage
    // on each completion: quadratic in the stage count).
    let jobs = req.jobs.max(1);
    let in_build: std::collections::BTreeSet<usize> = req.graph.order.iter().copied().collect();
    let mut schedule = Schedule::default();
    for &i in &req.graph.order {
        let deps: std::collections::BTreeSet<usize> = req.graph.stages[i]
            .deps
            .iter()
            .map(|e| e.stage)
            .filter(|d| in_build.contains(d) && *d != i)
            .collect();
        for d in &deps {
            schedule.dependents.entry(*d).or_default().push(i);
        }
        if deps.is_empty() {
            schedule.ready.push_back(i);
        }
        schedule.waiting.insert(i, deps.len());
    }
    schedule.left = req.graph.order.len();
    let schedule = Mutex::new(schedule);
    let wake = Condvar::new();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(req.graph.order.len().max(1)) {
            let (shared, schedule, wake) = (&shared, &schedule, &wake);
            s.spawn(move || loop {
                let Ok(mut g) = schedule.lock() else { return };
                let i = loop {
                    if g.failed.is_some() || g.left == 0 {
                        return;
                    }
                    if let Some(i) = g.ready.pop_front() {
                        break i;
                    }
                    g = match wake.wait(g) {
                        Ok(g) => g,
                        Err(_) => return,
                    };
                };
                drop(g);
                let mut cx = Ctx {
                    sh: shared,
                    step: 0,
                    platform: shared
                        .req
                        .graph
                        .stages
                        .get(i)
                        .and_then(|s| s.platform.as_deref())
                        .and_then(Platform::parse)
                        .unwrap_or_else(|| shared.req.platform.clone()),
                    inputs: Vec::new(),
                    volatile: false,
                };
                let r = cx.run_stage(i);
                // What was hashed stays useful even when a step failed.
                shared.hasher.save();
                let Ok(mut g) = schedule.lock() else { return };
                g.left -= 1;
                match r {
                    Ok(res) => {
                        if let Ok(mut results) = shared.results.lock() {
                            results.insert(i, res);
                        }
                        for d in g.dependents.remove(&i).unwrap_or_default() {
                            if let Some(n) = g.waiting.get_mut(&d) {
                                *n -= 1;
                                if *n == 0 {
                                    g.ready.push_back(d);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        if g.failed.is_none() {
                            g.failed = Some(e);
                        }
                    }
                }
                wake.notify_all();
            });
        }
    });
    let failed = schedule.lock().ok().and_then(|mut g| g.failed.take());
    if let Some(e) = failed {
        return Err(e);
    }
    let target = shared
        .results
        .lock()
        .ok()
        .and_then(|mut r| r.remove(&req.graph.target))
        .ok_or_else(|| BuildError::Other("the target stage produced no result".into()))?;
    let mut state = target.state;
    state.config.set_created(Some(shared.created.clone()));
    let image = state
        .commit(&store.blobs, &BTreeMap::new())
        .map_err(StoreError::from)?;
    let steps = shared.steps.into_inner().unwrap_or_default();
    let mut trace = shared.trace.into_inner().unwrap_or_default();
    // Stages finish in any order: the record is in build-file order.
    trace.steps.sort_by_key(|s| (s.stage, s.step));
    trace.target_stage = req.graph.target;
    Ok(Outcome {
        image,
        steps,
        trace,
    })
}

impl Ctx<'_, '_> {
    fn fail(&self, l: &Located, msg: impl Into<String>) -> BuildError {
        self.fail_at(l.span, &l.text, msg)
    }

    /// A failure of the current step, located at `span` of the build file.
    fn fail_at(&self, span: Span, text: &str, msg: impl Into<String>) -> BuildError {
        BuildError::Step(Box::new(StepFailure {
            file: self.req.file_name.clone(),
            line: span.line,
            column: span.column,
            step: format!("{}/{}", self.step, self.total.load(Ordering::Relaxed)),
            text: text.to_string(),
            msg: msg.into(),
            source_line: self.source_line(span.line),
            hint: None,
        }))
    }

    fn source_line(&self, line: usize) -> String {
        self.req
            .source
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim_end()
            .to_string()
    }

    fn run_stage(&mut self, index: usize) -> Result<StageResult, BuildError> {
        let stage = &self.req.graph.stages[index];
        let label = if self.req.show_platform {
            format!("{} stage-{}", self.platform.spec(), stage.label())
        } else {
            format!("stage-{}", stage.label())
        };
        self.step = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let from_text = self.source_line(stage.span.line).trim().to_string();
        self.req.reporter.step(
            self.step,
            self.total.load(Ordering::Relaxed),
            &label,
            &from_text,
        );
        let started = Instant::now();
        let p = &self.platform.clone();
        let mut inherited_args = BTreeMap::new();
        let mut parent_volatile = false;
        let (mut state, base_key) = match &stage.base {
            Base::Scratch => (
                scratch_base(&p.os, &p.architecture, p.variant.as_deref()),
                CacheKey::base(json!({"scratch": p.spec()})),
            ),
            Base::Stage(i) => {
                let parent = self.results.lock().ok().and_then(|r| {
                    r.get(i).map(|p| {
                        inherited_args = p.args.clone();
                        parent_volatile = p.volatile;
                        (p.state.clone(), p.key.clone())
                    })
                });
                parent.ok_or_else(|| {
                    BuildError::Other(format!("stage {} was not built before stage {}", i, index))
                })?
            }
            Base::Image(r) => {
                let img = self.fetch_image(r).map_err(|e| {
                    let hint = e.hint();
                    match self.fail_at(stage.span, &from_text, e.to_string()) {
                        BuildError::Step(mut f) => {
                            f.hint = hint;
                            BuildError::Step(f)
                        }
                        other => other,
                    }
                })?;
                self.trace_image(r, &img.manifest_digest.to_string());
                let mut state = img.state;
                // BuildKit gives a base image without PATH the default one, as it does scratch.
                if p.os != "windows" && !state.env().iter().any(|(k, _)| k == "PATH") {
                    state.set_env("PATH", crate::oci::image::DEFAULT_PATH);
                }
                (
                    state,
                    CacheKey::base(json!({"image": img.manifest_digest.to_string()})),
                )
            }
        };
        self.volatile = parent_volatile;
        let base_name = match &stage.base {
            Base::Scratch => "scratch".to_string(),
            Base::Stage(i) => format!("stage:{}", self.req.graph.stages[*i].label()),
            Base::Image(r) => r.clone(),
        };
        if let Ok(mut t) = self.trace.lock() {
            t.stages.insert(index, (stage.label(), base_name));
        }
        self.req.reporter.done(self.step, started.elapsed(), false);
        // Everything that shapes layer bytes and timestamps is part of the first key.
        let mut key = CacheKey::chain(
            &base_key,
            json!({
                "epoch": self.req.epoch,
                "compression": format!("{:?}", self.req.compression),
                // An arm64 step never hits an amd64 entry, whatever the base.
                "platform": self.platform.spec(),
            }),
        );
        let use_cache = !self.req.no_cache
            && !self
                .req
                .no_cache_filter
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&stage.label()) || *f == index.to_string());

        let mut view: Option<RootView> = None;
        let mut scope = Scope::new(inherited_args, state.env());
        let mut cmd_set = false;
        // ONBUILD triggers of the base run first, then are cleared from the child.
        let triggers: Vec<String> = state.docker.onbuild.take().unwrap_or_default();
        let mut work: Vec<Located> = Vec::new();
        for t in triggers {
            let (_, typed) = crate::syntax::parse_instructions(
                &format!("{} (ONBUILD of the base image)", self.req.file_name),
                &t,
            )
            .map_err(|e| BuildError::Other(e.to_string()))?;
            for mut l in typed {
                l.span = stage.span;
                work.push(l);
            }
        }
        self.total.fetch_add(work.len(), Ordering::Relaxed);
        work.extend(stage.instructions.iter().cloned());
        let mut pending_meta: Vec<String> = Vec::new();
        let stage_name = stage.label();
        for (step_in_stage, l) in work.iter().enumerate() {
            self.step = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
            self.req.reporter.step(
                self.step,
                self.total.load(Ordering::Relaxed),
                &label,
                &l.text,
            );
            let started = Instant::now();
            let layered = matches!(
                l.instruction,
                Instruction::Workdir(_)
                    | Instruction::Copy(_)
                    | Instruction::Add(_)
                    | Instruction::Run(_)
            );
            if !layered {
                // Metadata steps are cheap: apply now; they enter the key, with the config
                // they produced, at the next layer step or the stage's end (hashing the
                // config once per run of them, not once each: linear in the build file).
                self.apply(l, &mut state, &mut scope, &mut view, &mut cmd_set)?;
                pending_meta.push(l.text.clone());
                self.req.reporter.done(self.step, started.elapsed(), false);
                continue;
            }
            key = key_metadata(key, &mut pending_meta, &state);
            self.inputs.clear();
            let material = self.key_material(l, &state, &scope)?;
            key = CacheKey::chain(&key, material);
            let layers_before = state.layers.len();
            let trace_step = |cx: &mut Self, state: &ImageState| {
                let layer = (state.layers.len() > layers_before)
                    .then(|| state.layers.last())
                    .flatten()
                    .map(|l| (l.digest.to_string(), l.diff_id.to_string()));
                let record = StepTrace {
                    stage: index,
                    stage_name: stage_name.clone(),
                    step: step_in_stage + 1,
                    line: l.span.line,
                    op: l.text.clone(),
                    key: if cx.volatile {
                        String::new()
                    } else {
                        key.0.to_string()
                    },
                    inputs: std::mem::take(&mut cx.inputs),
                    layer,
                };
                if let Ok(mut t) = cx.trace.lock() {
                    t.steps.push(record);
                }
            };
            if use_cache {
                if let Some(hit) = self.claim(&key) {
                    state = hit.state;
                    self.record_step(index, &key);
                    trace_step(self, &state);
                    self.req.reporter.done(self.step, started.elapsed(), true);
                    continue;
                }
            }
            let outcome = self
                .sync_view(&mut view, &state)
                .and_then(|_| self.apply(l, &mut state, &mut scope, &mut view, &mut cmd_set));
            if outcome.is_ok() {
                match self.cache.put(&key, &state) {
                    Ok(()) => self.record_step(index, &key),
                    Err(e) => self
                        .req
                        .reporter
                        .warn(&format!("could not record the cache entry: {}", e)),
                }
            }
            if use_cache {
                self.release(&key);
            }
            outcome?;
            trace_step(self, &state);
            self.req.reporter.done(self.step, started.elapsed(), false);
        }
        let key = key_metadata(key, &mut pending_meta, &state);
        Ok(StageResult {
            state,
            key,
            view,
            args: scope.args,
            volatile: self.volatile,
        })
    }

    /// A cache hit for `key`, or `None` after marking it as being computed by this stage
    /// (an identical step already running elsewhere is waited for, then hit).
    fn claim(&self, key: &CacheKey) -> Option<crate::cache::Hit> {
        let id = key.0.to_string();
        let (inflight, done) = &*INFLIGHT;
        let mut running = inflight.lock().ok()?;
        loop {
            if let Some(hit) = self.cache.get(key) {
                return Some(hit);
            }
            if !running.contains(&id) {
                running.insert(id);
                return None;
            }
            running = done.wait(running).ok()?;
        }
    }

    fn record_step(&self, stage: usize, key: &CacheKey) {
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(StepRecord {
                stage,
                key: key.clone(),
            });
        }
    }

    /// Fetch a named or foreign image, pulling as the build's policy says.
    fn fetch_image(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let step = self.step;
        let reporter = self.req.reporter;
        let log = move |m: &str| reporter.log(step, m);
        let pulling = sources::Pulling {
            policy: self.req.pull,
            client: &self.req.registry,
            log: &log,
        };
        sources::fetch(self.store, reference, &self.platform, &pulling)
    }

    fn release(&self, key: &CacheKey) {
        let (inflight, done) = &*INFLIGHT;
        if let Ok(mut running) = inflight.lock() {
            running.remove(&key.0.to_string());
        }
        done.notify_all();
    }

    /// Create or grow `view` to show `state`'s layers.
    fn sync_view(&self, view: &mut Option<RootView>, state: &ImageState) -> Result<(), BuildError> {
        match view {
            Some(v) => v
                .sync(&self.snaps, &state.layers)
                .map_err(|e| BuildError::Other(e.to_string())),
            None => {
                *view = Some(self.view(&state.layers)?);
                Ok(())
            }
        }
    }

    fn word(&self, l: &Located, scope: &Scope, s: &str) -> Result<String, BuildError> {
        scope
            .word(self.req.escape, s)
            .map_err(|e| self.fail(l, e.0))
    }

    fn history(&self, state: &mut ImageState, created_by: String, layer: Option<LayerRef>) {
        state.push_history(&self.created, &created_by, layer);
    }

    fn apply(
        &mut self,
        l: &Located,
        state: &mut ImageState,
        scope: &mut Scope,
        view_slot: &mut Option<RootView>,
        cmd_set: &mut bool,
    ) -> Result<(), BuildError> {
        let rootfs_path = view_slot
            .as_ref()
            .map(|v| v.path().to_path_buf())
            .unwrap_or_default();
        let rootfs = rootfs_path.as_path();
        match &l.instruction {
            Instruction::From { .. } => return Err(self.fail(l, "FROM inside a stage")),
            Instruction::Arg(decls) => {
                let mut shown = Vec::new();
                for (name, default) in decls {
                    // BuildKit's history names the ARG with the default the file gives
                    // (expanded), never a --build-arg value.
                    match default {
                        Some(d) => shown.push(format!("{}={}", name, self.word(l, scope, d)?)),
                        None => shown.push(name.clone()),
                    }
                    let value = match self.req.build_args.get(name) {
                        Some(v) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(self.word(l, scope, d)?),
                            None => self
                                .req
                                .graph
                                .global_args
                                .get(name)
                                .cloned()
                                .flatten()
                                .or_else(|| {
                                    let pa = Platform::args(&self.req.platform, &Platform::host());
                                    pa.get(name).cloned()
                                }),
                        },
                    };
                    scope.declare(name, value);
                }
                self.history(state, format!("ARG {}", shown.join(" ")), None);
            }
            Instruction::Env(kvs) => {
                let mut shown = Vec::new();
                for (k, v) in kvs {
                    let k = self.word(l, scope, k)?;
                    let v = self.word(l, scope, v)?;
                    scope.set_env(&k, &v);
                    state.set_env(&k, &v);
                    shown.push(format!("{}={}", k, v));
                }
                self.history(state, format!("ENV {}", shown.join(" ")), None);
            }
            Instruction::Label(kvs) => {
                let mut shown = Vec::new();
                let mut pairs = Vec::new();
                for (k, v) in kvs {
                    let k = self.word(l, scope, k)?;
                    let v = self.word(l, scope, v)?;
                    shown.push(format!("{}={}", k, v));
                    pairs.push((k, v));
                }
                state.with_runtime(|c| {
                    let labels = c.labels_mut().get_or_insert_with(Default::default);
                    for (k, v) in pairs {
                        labels.insert(k, v);
                    }
                });
                self.history(state, format!("LABEL {}", shown.join(" ")), None);
            }
            Instruction::Maintainer(m) => {
                let m = self.word(l, scope, m)?;
                state.config.set_author(Some(m.clone()));
                self.history(state, format!("MAINTAINER {}", m), None);
            }
            Instruction::User(u) => {
                let u = self.word(l, scope, u)?;
                state.with_runtime(|c| {
                    c.set_user(Some(u.clone()));
                });
                self.history(state, format!("USER {}", u), None);
            }
            Instruction::Workdir(w) => {
                let w = self.word(l, scope, w)?;
                let cur = state
                    .runtime()
                    .working_dir()
                    .clone()
                    .unwrap_or_else(|| "/".into());
                // As BuildKit: an absolute path is kept as written (a trailing slash too), a
                // relative one is joined to the current directory and cleaned.
                let path = if w.starts_with('/') {
                    w.clone()
                } else {
                    clean_path(&format!("/{}/{}", cur, w))
                };
                state.with_runtime(|c| {
                    c.set_working_dir(Some(path.clone()));
                });
                let dir = clean_path(&path);
                // BuildKit makes the directory (and its parents, owned by USER) as a layer of
                // its own, empty when the directory exists; only `/` makes none.
                let layer = if dir == "/" {
                    None
                } else {
                    let exists =
                        unpack::resolve_in_root(rootfs, Path::new(dir.trim_start_matches('/')))
                            .map(|p| p.is_dir())
                            .unwrap_or(false);
                    if exists {
                        Some(self.commit_tree(l, &crate::oci::layer::LayerTree::default())?)
                    } else {
                        let owner = match state.runtime().user().clone().filter(|u| !u.is_empty()) {
                            Some(u) => {
                                Some(users::resolve_user(rootfs, &u).map_err(|e| self.fail(l, e))?)
                            }
                            None => None,
                        };
                        let staged = copy::stage(&copy::CopyPlan {
                            sources: Vec::new(),
                            dest: format!("{}/", dir),
                            root: &SourceRoot {
                                root: rootfs.to_path_buf(),
                                ignore: IgnoreMatcher::default(),
                                is_context: false,
                            },
                            owner,
                            chmod: None,
                            parents: false,
                            excludes: Vec::new(),
                            heredocs: &[],
                            is_add: false,
                            unpack: None,
                            checksum: None,
                            rootfs,
                            epoch: self.req.epoch,
                            expand_heredoc: &|s| Ok(s.to_string()),
                        })
                        .map_err(|e| self.fail(l, e.to_string()))?;
                        Some(self.commit_tree(l, &staged.tree)?)
                    }
                };
                self.history(state, format!("WORKDIR {}", path), layer);
            }
            Instruction::Expose(ports) => {
                let mut list = Vec::new();
                for p in ports {
                    for w in scope
                        .words(self.req.escape, p)
                        .map_err(|e| self.fail(l, e.0))?
                    {
                        list.extend(expand_port(&w).map_err(|e| self.fail(l, e))?);
                    }
                }
                state.with_runtime(|c| {
                    let mut all = c.exposed_ports().clone().unwrap_or_default();
                    all.extend(list.iter().cloned());
                    all.sort();
                    all.dedup();
                    c.set_exposed_ports(Some(all));
                });
                self.history(state, format!("EXPOSE {}", history::port_map(&list)), None);
            }
            Instruction::Volume(vols) => {
                let mut list = Vec::new();
                for v in vols {
                    let v = self.word(l, scope, v)?;
                    if v.trim().is_empty() {
                        return Err(self.fail(l, "VOLUME specified can not be an empty string"));
                    }
                    list.push(v);
                }
                state.with_runtime(|c| {
                    let mut all = c.volumes().clone().unwrap_or_default();
                    all.extend(list.iter().cloned());
                    all.sort();
                    all.dedup();
                    c.set_volumes(Some(all));
                });
                self.history(
                    state,
                    format!("VOLUME {}", history::plain_list(&list)),
                    None,
                );
            }
            Instruction::Stopsignal(s) => {
                let s = self.word(l, scope, s)?;
                state.with_runtime(|c| {
                    c.set_stop_signal(Some(s.clone()));
                });
                self.history(state, format!("STOPSIGNAL {}", s), None);
            }
            Instruction::Shell(sh) => {
                state.docker.shell = Some(sh.clone());
                self.history(state, format!("SHELL {}", history::plain_list(sh)), None);
            }
            Instruction::Cmd(c) => {
                let argv = self.argv(state, c);
                state.with_runtime(|cfg| {
                    cfg.set_cmd(Some(argv.clone()));
                });
                *cmd_set = true;
                self.history(state, format!("CMD {}", history::quoted_list(&argv)), None);
            }
            Instruction::Entrypoint(c) => {
                let argv = self.argv(state, c);
                let keep_cmd = *cmd_set;
                state.with_runtime(|cfg| {
                    cfg.set_entrypoint(Some(argv.clone()));
                    if !keep_cmd {
                        cfg.set_cmd(None);
                    }
                });
                self.history(
                    state,
                    format!("ENTRYPOINT {}", history::quoted_list(&argv)),
                    None,
                );
            }
            Instruction::Healthcheck(h) => {
                let config = match h {
                    Healthcheck::None => crate::oci::image::HealthConfig {
                        test: vec!["NONE".into()],
                        ..Default::default()
                    },
                    Healthcheck::Check {
                        test,
                        interval,
                        timeout,
                        start_period,
                        start_interval,
                        retries,
                    } => crate::oci::image::HealthConfig {
                        test: match test {
                            Command::Exec(a) => std::iter::once("CMD".to_string())
                                .chain(a.iter().cloned())
                                .collect(),
                            Command::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
                        },
                        interval: interval.unwrap_or(0),
                        timeout: timeout.unwrap_or(0),
                        start_period: start_period.unwrap_or(0),
                        start_interval: start_interval.unwrap_or(0),
                        retries: retries.unwrap_or(0),
                    },
                };
                let shown = history::healthcheck(
                    &config.test,
                    config.interval,
                    config.timeout,
                    config.start_period,
                    config.retries,
                );
                state.docker.healthcheck = Some(config);
                self.history(state, shown, None);
            }
            Instruction::Onbuild(t) => {
                state
                    .docker
                    .onbuild
                    .get_or_insert_with(Vec::new)
                    .push(t.clone());
                // BuildKit records no history entry for ONBUILD.
            }
            Instruction::Run(r) => {
                let view = view_slot
                    .as_mut()
                    .ok_or_else(|| BuildError::Other("internal: RUN without a root view".into()))?;
                let (layer, created_by) = self.run_step(l, r, state, scope, view)?;
                self.history(state, created_by, Some(layer));
            }
            Instruction::Copy(c) | Instruction::Add(c) => {
                let is_add = matches!(l.instruction, Instruction::Add(_));
                let mut sources = Vec::new();
                for s in &c.sources {
                    sources.push(self.word(l, scope, s)?);
                }
                let dest_raw = self.word(l, scope, &c.dest)?;
                // BuildKit's history: the instruction, its expanded sources and destination,
                // no flags.
                let mut shown = String::from(if is_add { "ADD" } else { "COPY" });
                for s in sources.iter().chain(std::iter::once(&dest_raw)) {
                    shown.push(' ');
                    shown.push_str(s);
                }
                let workdir = state
                    .runtime()
                    .working_dir()
                    .clone()
                    .unwrap_or_else(|| "/".into());
                let trailing =
                    dest_raw.ends_with('/') || dest_raw.ends_with("/.") || dest_raw == ".";
                let mut dest = if dest_raw.starts_with('/') {
                    clean_path(&dest_raw)
                } else {
                    clean_path(&format!("{}/{}", workdir, dest_raw))
                };
                if trailing && !dest.ends_with('/') {
                    dest.push('/');
                }
                let owner = match &c.chown {
                    Some(spec) => Some(
                        users::resolve_chown(rootfs, &self.word(l, scope, spec)?)
                            .map_err(|e| self.fail(l, e))?,
                    ),
                    None => None,
                };
                let chmod = match &c.chmod {
                    Some(m) => Some(self.word(l, scope, m)?),
                    None => None,
                };
                let ctx_root;
                let root: &SourceRoot = match &c.from {
                    None => {
                        ctx_root = self.context_root();
                        &ctx_root
                    }
                    Some(f) => {
                        let f = self.word(l, scope, f)?;
                        let dir = self.source_for(l, &f)?;
                        ctx_root = SourceRoot {
                            root: dir,
                            ignore: IgnoreMatcher::default(),
                            is_context: false,
                        };
                        &ctx_root
                    }
                };
                let escape = self.req.escape;
                let scope_for_heredoc = scope.clone();
                let expand_heredoc = move |s: &str| -> Result<String, String> {
                    let lexer = crate::syntax::expand::Lexer::new(
                        escape,
                        crate::syntax::expand::LexOptions {
                            raw_quotes: true,
                            raw_escapes: true,
                            skip_unset: false,
                        },
                    );
                    lexer
                        .word(s, &|n| scope_for_heredoc.get(n))
                        .map_err(|e| e.0)
                };
                let plan = copy::CopyPlan {
                    sources,
                    dest,
                    root,
                    owner,
                    chmod,
                    parents: c.parents,
                    excludes: c.excludes.clone(),
                    heredocs: &c.heredocs,
                    is_add,
                    unpack: c.unpack,
                    checksum: c.checksum.clone(),
                    rootfs,
                    epoch: self.req.epoch,
                    expand_heredoc: &expand_heredoc,
                };
                let staged = copy::stage(&plan).map_err(|e| self.fail(l, e.to_string()))?;
                if c.checksum.is_none() {
                    for (url, digest) in &staged.fetched {
                        self.trace_url(url, digest);
                    }
                }
                for s in &staged.skipped {
                    self.req.reporter.warn(&format!(
                        "{}:{}: {}: skipped {}: only files, directories and symlinks are copied",
                        self.req.file_name, l.span.line, l.text, s
                    ));
                }
                let layer = self.commit_tree(l, &staged.tree)?;
                self.history(state, format!("{} # builder", shown), Some(layer));
            }
        }
        Ok(())
    }

    /// Run one RUN step in the sandbox; returns its layer and history text.
    fn run_step(
        &mut self,
        l: &Located,
        r: &crate::syntax::instruction::Run,
        state: &ImageState,
        scope: &Scope,
        view: &mut RootView,
    ) -> Result<(LayerRef, String), BuildError> {
        let rootfs_path = view.path().to_path_buf();
        let rootfs = rootfs_path.as_path();
        if let Err(e) = worker::sandbox::emulation::check(&self.platform.architecture) {
            return Err(self.fail(l, e));
        }
        if !is_root() {
            return Err(self.fail(l, "RUN needs root or an unprivileged user namespace, and neither is available here (see the warning above)"));
        }
        let shell: Vec<String> = shell_of(state);
        let (argv, script) = run::argv_of(r, &shell);
        if argv.is_empty() {
            return Err(self.fail(l, "RUN has an empty command"));
        }
        let runtime = state.runtime();
        let user = runtime.user().clone();
        let (uid, gid, groups, home) =
            run::resolve_step_user(rootfs, user.as_deref()).map_err(|e| self.fail(l, e))?;
        let mut env = run::env_of(&state.env(), scope, &self.req.build_args, home);
        let cwd = runtime
            .working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        let (network, insecure) = self.sandbox_of(l, r)?;
        let scratch = self.store.scratch_dir("run-")?;

        // /etc files provided for the step, never captured.
        let etc = scratch.path().join("etc");
        fs::create_dir_all(&etc).map_err(|e| self.fail(l, e.to_string()))?;
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let resolv = match network {
            worker::sandbox::NetworkMode::Private => {
                worker::sandbox::network::private_resolv_conf(&host_resolv)
            }
            _ => host_resolv,
        }
        .into_bytes();
        let files = [
            ("resolv.conf", resolv),
            (
                "hosts",
                b"127.0.0.1\tlocalhost builder\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    .to_vec(),
            ),
            ("hostname", b"builder\n".to_vec()),
        ];
        let mut etc_files = Vec::new();
        for (name, data) in files {
            let p = etc.join(name);
            fs::write(&p, data).map_err(|e| self.fail(l, e.to_string()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                .map_err(|e| self.fail(l, e.to_string()))?;
            etc_files.push((p, format!("/etc/{}", name)));
        }

        // RUN --mount.
        let mut parsed = Vec::new();
        for m in &r.mounts {
            let spec = self.word(l, scope, m)?;
            parsed.push(crate::syntax::mount::Mount::parse(&spec).map_err(|e| self.fail(l, e))?);
        }
        let ctx_root = self.context_root();
        let mut guards = run::MountGuards::default();
        let mut from_err = None;
        let store_root = self.store.root().to_path_buf();
        let secrets = self.req.secrets.clone();
        let (mut mounts, secret_env) = {
            let mut lookup = |f: &str| -> Result<PathBuf, String> {
                match self.source_for(l, f) {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        let m = e.to_string();
                        from_err = Some(e);
                        Err(m)
                    }
                }
            };
            let mut me = run::MountEnv {
                store_root: &store_root,
                scratch: scratch.path(),
                context: &ctx_root,
                secrets: &secrets,
                from_root: &mut lookup,
                workdir: &cwd,
            };
            match run::resolve_mounts(&parsed, &mut me, &mut guards) {
                Ok(x) => x,
                Err(e) => return Err(from_err.unwrap_or_else(|| self.fail(l, e))),
            }
        };
        env.extend(secret_env);
        if let Some(body) = script {
            let p = scratch.path().join("script");
            fs::write(&p, body).map_err(|e| self.fail(l, e.to_string()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                .map_err(|e| self.fail(l, e.to_string()))?;
            mounts.push(worker::ExtraMount::Bind {
                source: p,
                target: run::SCRIPT_PATH.into(),
                readonly: true,
            });
        }

        let spec = worker::RunSpec {
            root: worker::sandbox::RootMount::Bind {
                dir: PathBuf::new(),
            },
            argv: argv.clone(),
            env,
            cwd,
            uid,
            gid,
            groups,
            hostname: "builder".into(),
            network,
            insecure,
            etc_files,
            mounts,
            executor: self.req.executor.clone(),
        };
        let step_dir = scratch.path().join("step");
        fs::create_dir_all(&step_dir).map_err(|e| self.fail(l, e.to_string()))?;
        let mut tail = run::Tail::new(12);
        let reporter = self.req.reporter;
        let step = self.step;
        let (exit, diff) = worker::run_step(
            worker::StepInput {
                view: &*view,
                scratch: &step_dir,
                spec,
            },
            &mut |line| {
                reporter.log(step, line);
                tail.push(line);
            },
        )
        .map_err(|e| self.fail(l, e.to_string()))?;
        drop(guards);
        match exit {
            Exit::Code(0) => {}
            Exit::Code(c) => return Err(self.fail(l, format!("exit code {}{}", c, tail.render()))),
            Exit::Signal(s) => {
                return Err(self.fail(
                    l,
                    format!(
                        "killed by {}{}",
                        worker::sandbox::signal_name(s),
                        tail.render()
                    ),
                ))
            }
        }
        let layer = self.commit_layer(l, &diff, view)?;
        // BuildKit lists every ARG the stage declared, in order, with its value now (empty
        // when it has none).
        let args: String = if scope.declared.is_empty() {
            String::new()
        } else {
            format!(
                "|{} {} ",
                scope.declared.len(),
                scope
                    .declared
                    .iter()
                    .map(|k| format!("{}={}", k, scope.get(k).unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        Ok((layer, format!("RUN {}{} # builder", args, argv.join(" "))))
    }

    /// The step's network and whether it runs insecure, refused unless the build holds the
    /// entitlement (checked for cached steps too, as BuildKit checks the whole definition).
    fn sandbox_of(
        &self,
        l: &Located,
        r: &crate::syntax::instruction::Run,
    ) -> Result<(worker::sandbox::NetworkMode, bool), BuildError> {
        use worker::sandbox::NetworkMode;
        let network = match r.network.unwrap_or(self.req.network) {
            Network::Default => NetworkMode::Private,
            Network::None => NetworkMode::Loopback,
            Network::Host => {
                if !self.req.entitlements.network_host {
                    return Err(self.fail(
                        l,
                        "network host is not allowed: start the build with --allow network.host",
                    ));
                }
                NetworkMode::Host
            }
        };
        let insecure = r.security.as_deref() == Some("insecure");
        if insecure && !self.req.entitlements.security_insecure {
            return Err(self.fail(
                l,
                "--security=insecure is not allowed: start the build with --allow security.insecure",
            ));
        }
        Ok((network, insecure))
    }

    /// Everything that decides a layer-producing step's result, after expansion.
    fn key_material(
        &mut self,
        l: &Located,
        state: &ImageState,
        scope: &Scope,
    ) -> Result<Value, BuildError> {
        let runtime = state.runtime();
        let workdir = runtime.working_dir().clone().unwrap_or_else(|| "/".into());
        let user = runtime.user().clone().unwrap_or_default();
        let mut m = json!({"text": l.text, "workdir": workdir, "user": user});
        match &l.instruction {
            Instruction::Workdir(w) => {
                m["path"] = json!(self.word(l, scope, w)?);
            }
            Instruction::Copy(c) | Instruction::Add(c) => {
                let mut sources = Vec::new();
                for src in &c.sources {
                    sources.push(self.word(l, scope, src)?);
                }
                let opt = |v: &Option<String>| -> Result<Option<String>, BuildError> {
                    v.as_ref().map(|x| self.word(l, scope, x)).transpose()
                };
                m["sources"] = json!(sources);
                m["dest"] = json!(self.word(l, scope, &c.dest)?);
                m["chown"] = json!(opt(&c.chown)?);
                m["chmod"] = json!(opt(&c.chmod)?);
                m["flags"] = json!({"link": c.link, "parents": c.parents, "excludes": c.excludes, "checksum": c.checksum, "unpack": c.unpack, "keep_git_dir": c.keep_git_dir});
                let docs: Vec<Value> = c
                    .heredocs
                    .iter()
                    .map(|h| json!([h.name, h.content, h.expand]))
                    .collect();
                m["heredocs"] = json!(docs);
                if !c.heredocs.is_empty() {
                    // Heredoc bodies may expand variables: key on the values in scope.
                    m["scope"] = json!(scope
                        .args
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<BTreeMap<_, _>>());
                    m["env"] = json!(scope.env());
                }
                if sources.iter().any(|s| copy::is_url(s)) && c.checksum.is_none() {
                    // Remote content is unknown until fetched: never reuse such a step.
                    m["uncacheable"] = json!(format!("{:?}", std::time::SystemTime::now()));
                }
                match opt(&c.from)? {
                    Some(f) => m["from"] = json!(self.identity_of_from(l, &f)?),
                    None => {
                        let local: Vec<String> = sources
                            .iter()
                            .filter(|s| {
                                !copy::is_url(s)
                                    && crate::syntax::parser::parse_heredoc_word(s).is_none()
                            })
                            .cloned()
                            .collect();
                        let excludes = IgnoreMatcher::new(&c.excludes)
                            .map_err(|e| self.fail(l, format!("--exclude: {}", e)))?;
                        m["context"] = json!(self.context_digest(l, &local, &excludes)?);
                    }
                }
                if let Some(sum) = &c.checksum {
                    for u in sources.iter().filter(|s| copy::is_url(s)) {
                        self.trace_url(u, sum);
                    }
                } else if sources.iter().any(|s| copy::is_url(s)) {
                    self.volatile = true;
                }
            }
            Instruction::Run(r) => {
                let shell: Vec<String> = shell_of(state);
                let (argv, script) = run::argv_of(r, &shell);
                let env = run::env_of(&state.env(), scope, &self.req.build_args, None);
                let args: BTreeMap<&String, &String> = scope
                    .args
                    .iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
                    .collect();
                self.inputs.push(json!({ "args": args }));
                m["argv"] = json!(argv);
                m["script"] = json!(script);
                m["env"] = json!(env);
                let (network, insecure) = self.sandbox_of(l, r)?;
                m["network"] = json!(format!("{:?}", network));
                m["security"] = json!(insecure);
                let mut mounts = Vec::new();
                for spec in &r.mounts {
                    let spec = self.word(l, scope, spec)?;
                    let mount =
                        crate::syntax::mount::Mount::parse(&spec).map_err(|e| self.fail(l, e))?;
                    let mut entry = json!({"spec": spec});
                    if mount.kind == crate::syntax::mount::MountType::Bind {
                        match &mount.from {
                            Some(f) => entry["from"] = json!(self.identity_of_from(l, f)?),
                            None => {
                                let src = mount.source.clone().unwrap_or_else(|| ".".into());
                                entry["context"] = json!(self.context_digest(
                                    l,
                                    &[src],
                                    &IgnoreMatcher::default()
                                )?);
                            }
                        }
                    }
                    mounts.push(entry);
                }
                m["mounts"] = json!(mounts);
            }
            _ => {}
        }
        Ok(m)
    }

    /// What a `--from` stands for in a key: a stage's result key, or an image's digest.
    fn identity_of_from(&mut self, l: &Located, from: &str) -> Result<String, BuildError> {
        if let Some(i) = self.stage_index(from) {
            let found = self
                .results
                .lock()
                .ok()
                .and_then(|r| r.get(&i).map(|r| (r.key.0.to_string(), r.volatile)));
            self.volatile |= found.as_ref().is_some_and(|(_, v)| *v);
            let key = found.map(|(k, _)| k);
            if let Some(k) = &key {
                let name = self.req.graph.stages[i].label();
                self.inputs.push(json!({"stage": name, "key": k}));
            }
            return key.map(|k| format!("stage:{}", k)).ok_or_else(|| {
                self.fail(l, format!("stage {} is not built before this step", from))
            });
        }
        let external = self.external_image(l, from)?;
        let digest = external
            .get(from)
            .map(|x| x.image.manifest_digest.to_string())
            .unwrap_or_default();
        drop(external);
        self.trace_image(from, &digest);
        self.inputs.push(json!({"image": from, "digest": digest}));
        Ok(format!("image:{}", digest))
    }

    /// The external images, with `from` fetched (once per build).
    fn external_image(
        &self,
        l: &Located,
        from: &str,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, ExternalImage>>, BuildError> {
        let mut external = self
            .external
            .lock()
            .map_err(|_| BuildError::Other("a stage thread panicked".into()))?;
        if !external.contains_key(from) {
            let image = self
                .fetch_image(from)
                .map_err(|e| self.fail(l, e.to_string()))?;
            external.insert(from.to_string(), ExternalImage { image, view: None });
        }
        Ok(external)
    }

    /// The stage a `--from` value names, if it names one.
    fn stage_index(&self, from: &str) -> Option<usize> {
        let stages = &self.req.graph.stages;
        from.parse::<usize>()
            .ok()
            .filter(|i| *i < stages.len())
            .or_else(|| {
                stages
                    .iter()
                    .position(|s| s.name.as_deref() == Some(&from.to_lowercase()))
            })
    }

    /// The files a `--from` names: an earlier stage's root filesystem, or an image's.
    fn source_for(&mut self, l: &Located, from: &str) -> Result<PathBuf, BuildError> {
        if let Some(i) = self.stage_index(from) {
            // A finished stage's root, viewed (and brought up to date) on first use.
            let mut results = self
                .results
                .lock()
                .map_err(|_| BuildError::Other("a stage thread panicked".into()))?;
            let Some(r) = results.get_mut(&i) else {
                drop(results);
                return Err(self.fail(l, format!("stage {} is not built before this step", from)));
            };
            let outcome = match r.view.as_mut() {
                Some(v) => v
                    .sync(&self.snaps, &r.state.layers)
                    .map(|_| v.path().to_path_buf())
                    .map_err(|e| e.to_string()),
                None => match RootView::new(&self.snaps, self.snapshotter, &r.state.layers) {
                    Ok(v) => {
                        let p = v.path().to_path_buf();
                        r.view = Some(v);
                        Ok(p)
                    }
                    Err(e) => Err(e.to_string()),
                },
            };
            drop(results);
            return outcome.map_err(|e| self.fail(l, e));
        }
        let mut external = self.external_image(l, from)?;
        let Some(x) = external.get_mut(from) else {
            return Err(BuildError::Other(format!(
                "internal: image {} was not fetched",
                from
            )));
        };
        if x.view.is_none() {
            x.view = Some(self.view(&x.image.state.layers)?);
        }
        Ok(x.view
            .as_ref()
            .map(|v| v.path().to_path_buf())
            .unwrap_or_default())
    }

    /// The build context as COPY, ADD and bind mounts read it.
    fn context_root(&self) -> SourceRoot {
        SourceRoot {
            root: self.req.context.clone(),
            ignore: self.req.ignore.clone(),
            is_context: true,
        }
    }

    /// The content digest of what reading `sources` from the context sees. Each source's
    /// entries, with a digest of them, go into the step's provenance record.
    fn context_digest(
        &mut self,
        l: &Located,
        sources: &[String],
        excludes: &IgnoreMatcher,
    ) -> Result<String, BuildError> {
        let root = self.context_root();
        let mut entries = Vec::new();
        let mut ends = Vec::new();
        for src in sources {
            let mut one = root
                .enumerate(std::slice::from_ref(src), excludes)
                .map_err(|e| self.fail(l, e.to_string()))?;
            entries.append(&mut one);
            ends.push(entries.len());
        }
        let (digest, leaves) = self
            .hasher
            .describe_leaves(&entries, self.req.epoch, self.context_owner())
            .map_err(|e| self.fail(l, e.to_string()))?;
        let mut start = 0;
        for (src, end) in sources.iter().zip(ends) {
            let covered = entries[start..end]
                .iter()
                .map(|(rel, _)| rel)
                .zip(&leaves[start..end]);
            let d = crate::attest::trace::leaves_digest(covered);
            self.inputs
                .push(json!({"context": src, "digest": d.to_string()}));
            start = end;
        }
        if let Ok(mut t) = self.trace.lock() {
            for ((rel, _), leaf) in entries.into_iter().zip(leaves) {
                t.context.insert(rel, leaf);
            }
        }
        Ok(digest)
    }

    /// The owner of the context directory (whoever checked it out).
    fn context_owner(&self) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.req.context)
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or((0, 0))
    }

    /// Record that the step read `url`, whose content has `digest`.
    fn trace_url(&mut self, url: &str, digest: &str) {
        self.inputs.push(json!({"url": url, "digest": digest}));
        if let Ok(mut t) = self.trace.lock() {
            t.urls.insert(url.to_string(), digest.to_string());
        }
    }

    /// Record that `reference` resolved to the image manifest `digest`.
    fn trace_image(&self, reference: &str, digest: &str) {
        if let Ok(mut t) = self.trace.lock() {
            t.images.insert(reference.to_string(), digest.to_string());
        }
    }

    /// A view of `layers` with this build's snapshotter.
    fn view(&self, layers: &[LayerRef]) -> Result<RootView, BuildError> {
        RootView::new(&self.snaps, self.snapshotter, layers)
            .map_err(|e| BuildError::Other(e.to_string()))
    }

    /// Write a layer described as a tree. The stage's view catches up lazily, only when a
    /// later step needs the filesystem.
    fn commit_tree(
        &self,
        l: &Located,
        tree: &crate::oci::layer::LayerTree,
    ) -> Result<LayerRef, BuildError> {
        let layer = self.write_step_layer(l, crate::oci::layer::LayerSource::Tree(tree))?;
        Ok(layer.into())
    }

    /// Turn a staged tree into a layer and put it on the stage's view; the tree itself
    /// becomes the layer's snapshot.
    fn commit_layer(
        &self,
        l: &Located,
        staging: &Path,
        view: &mut RootView,
    ) -> Result<LayerRef, BuildError> {
        let layer = self.write_step_layer(l, crate::oci::layer::LayerSource::Dir(staging))?;
        let layer: LayerRef = layer.into();
        view.add_layer_from_dir(&self.snaps, &layer, staging)
            .map_err(|e| self.fail(l, e.to_string()))?;
        Ok(layer)
    }

    /// Write the layer of step `l`. A gzip layer reuses the compressed chunks that the last
    /// layer of the same step (platform and instruction) shares with it, and says how many
    /// it compressed.
    fn write_step_layer(
        &self,
        l: &Located,
        source: crate::oci::layer::LayerSource,
    ) -> Result<crate::oci::layer::Layer, BuildError> {
        let identity = format!("{}\0{}", self.platform.spec(), l.text);
        let root = self.store.root();
        let previous =
            crate::cache::chunks::PreviousChunks::of_step(root, &self.store.blobs, &identity);
        // The SBOM's look at this layer is taken as it is written.
        let mut scanner = crate::attest::sbom::StreamScanner::default();
        let layer = crate::oci::layer::write_layer_from(
            &self.store.blobs,
            source,
            LayerOptions {
                compression: self.req.compression,
                epoch: Some(self.req.epoch),
                reuse: previous
                    .as_ref()
                    .map(|p| p as &dyn crate::oci::pgzip::ChunkReuse),
            },
            Some(&mut scanner),
        )
        .map_err(|e| self.fail(l, e.to_string()))?;
        if let Some(scan) = scanner.finish() {
            crate::attest::sbom::store_scan(
                &crate::attest::sbom::cache_dir(root),
                &layer.diff_id,
                &scan,
            );
        }
        if let Compression::Gzip(level) = self.req.compression {
            crate::cache::chunks::remember(root, &identity, &layer, level);
            self.req.reporter.log(
                self.step,
                &format!(
                    "layer {}: {} chunks, {} compressed, {} reused",
                    layer.digest,
                    layer.chunks.len(),
                    layer.chunks.len() - layer.reused,
                    layer.reused
                ),
            );
        }
        Ok(layer)
    }

    fn argv(&self, state: &ImageState, c: &Command) -> Vec<String> {
        match c {
            Command::Exec(a) => a.clone(),
            Command::Shell(s) => {
                let mut shell = shell_of(state);
                shell.push(s.clone());
                shell
            }
        }
    }
}

/// The image's SHELL, or docker's default.
fn shell_of(state: &ImageState) -> Vec<String> {
    state
        .docker
        .shell
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
}

/// `80`, `80/udp`, `8000-8002/tcp` -> `["80/tcp"]`, ...
fn expand_port(p: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match p.split_once('/') {
        Some((a, b)) => (a, b.to_lowercase()),
        None => (p, "tcp".to_string()),
    };
    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        return Err(format!("invalid protocol {:?} in EXPOSE {}", proto, p));
    }
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a, b),
        None => (ports, ports),
    };
    let lo: u16 = lo
        .parse()
        .map_err(|_| format!("invalid port {:?} in EXPOSE", p))?;
    let hi: u16 = hi
        .parse()
        .map_err(|_| format!("invalid port {:?} in EXPOSE", p))?;
    if hi < lo {
        return Err(format!("invalid port range {:?} in EXPOSE", p));
    }
    Ok((lo..=hi).map(|n| format!("{}/{}", n, proto)).collect())
}
