//! The solver: runs an op graph's stages (concurrently where they are independent), applies
//! each op to an [`ImageState`], asks the cache before every layer-producing op, writes the
//! layers mkdir, copy and exec ops produce, and commits the target stage as an image. A
//! stage's filesystem is a [`RootView`] of shared layer snapshots, created only when an op
//! has to read it. It knows nothing of build-file text: the ops come resolved from the
//! frontend.

pub mod copy;
pub mod run;
pub mod users;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use crate::attest::trace::{BuildTrace, ContextLeaf, ContextListing, StepTrace};
use crate::cache::context_hash::ContextHasher;
use crate::cache::remote::RemoteCache;
use crate::cache::{CacheIndex, CacheKey};
use crate::context::{IgnoreMatcher, SourceRoot};
use crate::oci::at::SourceStat;
use crate::oci::digest::Digest;
use crate::oci::image::{rfc3339, ImageState, LayerRef, StoredImage};
use crate::oci::layer::{Compression, LayerOptions};
use crate::oci::platform::Platform;
use crate::oci::unpack;
use crate::plan::{
    Action, CopyOp, ExecOp, Input, MkdirOp, MountKind, Network, Op, OpGraph, Origin, Source,
};
use crate::progress::Reporter;
use crate::registry::{Client, PullPolicy};
use crate::store::{sources, Bucket, Store, StoreError, StoreFile};
use crate::worker::snapshots::{chain_ids, next_chain, RootView, Snapshots, ViewNeed};
use crate::worker::{self, Exit, Snapshotter};

/// Everything a build needs besides the store.
#[derive(Clone)]
pub struct BuildRequest<'a> {
    /// The build file's name and text, for locating errors.
    pub file_name: String,
    pub source: String,
    pub graph: OpGraph,
    pub context: PathBuf,
    pub ignore: IgnoreMatcher,
    pub epoch: i64,
    pub compression: Compression,
    /// `--force-compression`: the image's inherited layers too are compressed as
    /// `compression` says (not only the layers the build writes).
    pub force_compression: bool,
    pub platform: Platform,
    pub reporter: &'a dyn Reporter,
    /// What the build may weaken in the sandbox (`--allow`).
    pub entitlements: Entitlements,
    /// Who runs RUN steps (`--runtime`).
    pub executor: worker::sandbox::Executor,
    /// How RUN steps are isolated (`--isolation`).
    pub isolation: worker::Isolation,
    /// Paths of builder's own in the container that `--isolation container` never lays
    /// out over (store, context, build file, outputs).
    pub keep: Vec<PathBuf>,
    /// `--secret` sources by id.
    pub secrets: BTreeMap<String, run::SecretSource>,
    /// `--no-cache`: run every step.
    pub no_cache: bool,
    /// `--no-cache-filter`: stages (names or indexes) whose steps all run.
    pub no_cache_filter: Vec<String>,
    /// Parallelism for stages and for hashing.
    pub jobs: usize,
    /// When `--from` pulls named images from their registry.
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
            crate::text::abbreviate(&self.text, 120),
            crate::text::abbreviate(&self.msg, 4000),
            caret(&self.source_line, self.column)
        )
    }
}

/// Chain the config-only ops met since the last key into `key`; nothing when there were
/// none. Their edits are typed, so their keys say all they did.
fn key_config_ops(key: CacheKey, pending: &mut Vec<String>) -> CacheKey {
    if pending.is_empty() {
        return key;
    }
    CacheKey::chain(&key, json!({ "config_ops": std::mem::take(pending) }))
}

/// The offending line and a caret under `column`, as syntax errors show them.
fn caret(line: &str, column: usize) -> String {
    if line.is_empty() {
        return String::new();
    }
    let (shown, caret) = crate::text::window(line, column);
    format!("\n  {}\n  {}^", shown, " ".repeat(caret))
}

struct StageResult {
    state: ImageState,
    /// The key of the stage's last step: what `COPY --from` and `FROM <stage>` key on.
    key: CacheKey,
    view: Option<RootView>,
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
    /// Why RUN cannot have builder's sandbox here (no namespace could be made).
    sandbox_unavailable: Option<String>,
    /// Whether a step gets its own PID namespace and /proc (else the relaxed sandbox),
    /// probed at the first RUN.
    process_sandbox: std::sync::OnceLock<Result<bool, String>>,
    /// `--isolation container`: what a step's layout never touches.
    kept: Option<worker::inplace::Kept>,
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
    /// The `lstat` of each context file the current step's key was computed from, when
    /// one had changed (the step will likely run): its COPY takes them instead of stating
    /// every file again.
    source_stats: Option<HashMap<PathBuf, SourceStat>>,
    /// The snapshot the next step will read of the current step's layer (its kind, and the
    /// chain below the layer), made from the layer's tar as it is written.
    snapshot_ahead: Option<(Option<Digest>, ViewNeed)>,
    /// Context listings still being written out on threads of their own (a large context's
    /// takes tens of ms, which the step's staging and layer writing need not wait for), with
    /// where each goes in the trace.
    listings: Vec<(usize, std::thread::JoinHandle<ContextListing>)>,
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
    let total = req.graph.stages.iter().map(|s| s.ops.len() + 1).sum();
    // Held for the whole build so `cache prune` never removes what this build is writing.
    let _lease = crate::cache::gc::build_lease(store)?;
    let kept = match req.isolation {
        worker::Isolation::Container => Some(container_isolation(store, req)?),
        worker::Isolation::Sandbox => None,
    };
    let (snapshotter, sandbox_unavailable) = choose_snapshotter(store, req)?;
    // The context is read without following a symlink that was not there when it was walked
    // (held from builder's own mount namespace, entered just above, so that what is opened
    // through it can be bound).
    let _confined = crate::oci::at::confine(&req.context).map_err(|e| {
        BuildError::Other(format!("build context {}: {}", req.context.display(), e))
    })?;
    let shared = Shared {
        store,
        req,
        results: Mutex::new(BTreeMap::new()),
        created: rfc3339(req.epoch),
        counter: AtomicUsize::new(0),
        total: AtomicUsize::new(total),
        external: Mutex::new(BTreeMap::new()),
        snapshotter,
        snaps: Snapshots::new(
            &store.dir(Bucket::Snapshots),
            &store.dir(Bucket::Tmp),
            &store.blobs,
        ),
        cache: CacheIndex::new(&store.dir(Bucket::Steps), &store.blobs)
            .with_remotes(req.cache_from.clone()),
        hasher: ContextHasher::open(
            &store.file(StoreFile::ContextStats),
            &store.dir(Bucket::Listings),
            req.jobs,
        ),
        steps: Mutex::new(Vec::new()),
        trace: Mutex::new(BuildTrace {
            isolation: req.isolation.name().to_string(),
            ..BuildTrace::default()
        }),
        sandbox_unavailable,
        process_sandbox: std::sync::OnceLock::new(),
        kept,
    };
    // Stages run as soon as the stages they read are done, on at most `jobs` worker threads
    // that take ready stages from a queue (a thread per stage would wake every waiting stage
    // on each completion: quadratic in the stage count).
    let jobs = req.jobs.max(1);
    let in_build: std::collections::BTreeSet<usize> =
        req.graph.stages.iter().map(|s| s.index).collect();
    let mut schedule = Schedule::default();
    for stage in &req.graph.stages {
        let deps: Vec<usize> = stage
            .deps
            .iter()
            .copied()
            .filter(|d| in_build.contains(d))
            .collect();
        for d in &deps {
            schedule.dependents.entry(*d).or_default().push(stage.index);
        }
        if deps.is_empty() {
            schedule.ready.push_back(stage.index);
        }
        schedule.waiting.insert(stage.index, deps.len());
    }
    schedule.left = req.graph.stages.len();
    let schedule = Mutex::new(schedule);
    let wake = Condvar::new();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(req.graph.stages.len().max(1)) {
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
                        .stage(i)
                        .map(|s| s.platform.clone())
                        .unwrap_or_else(|| shared.req.platform.clone()),
                    inputs: Vec::new(),
                    volatile: false,
                    source_stats: None,
                    snapshot_ahead: None,
                    listings: Vec::new(),
                };
                let r = cx.run_stage(i);
                let r = cx.settle_listings().and(r);
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
    if req.force_compression {
        state.layers = force_compression(store, &state.layers, req.compression, req.reporter)?;
    }
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

/// `layers`, each compressed as `compression` says: a layer compressed otherwise (a base
/// image's) is decompressed and compressed again, its diff_id checked. A conversion is
/// remembered by the source digest and the compression, so a rebuild does not repeat it.
fn force_compression(
    store: &Store,
    layers: &[LayerRef],
    compression: Compression,
    reporter: &dyn Reporter,
) -> Result<Vec<LayerRef>, BuildError> {
    let memo = store.memo(Bucket::Converted);
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        if crate::oci::layer::compressed_as(&l.media_type, compression) {
            out.push(l.clone());
            continue;
        }
        let memo_key = format!("{}-{}", l.digest.hex(), compression.key());
        let remembered = memo
            .get(&memo_key)
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| LayerRef::from_json(&v))
            .filter(|c| c.diff_id == l.diff_id && store.blobs.available(&c.digest));
        let converted = match remembered {
            Some(c) => c,
            None => {
                let blob = store.blobs.ensure(&l.digest).map_err(StoreError::from)?;
                let c = crate::oci::layer::recompress(&store.blobs, l, &blob, compression)
                    .map_err(|e| BuildError::Other(e.to_string()))?;
                reporter.log(
                    0,
                    &format!(
                        "layer {} ({}) compressed again as {}: {}",
                        l.digest,
                        l.media_type,
                        compression.media_type(),
                        c.digest
                    ),
                );
                memo.put(&memo_key, &crate::oci::image::canonical_json(&c.to_json()));
                c
            }
        };
        out.push(converted);
    }
    Ok(out)
}

impl Ctx<'_, '_> {
    /// A failure of the current step, located at the op's line of the build file.
    fn fail(&self, origin: &Origin, msg: impl Into<String>) -> BuildError {
        BuildError::Step(Box::new(StepFailure {
            file: self.req.file_name.clone(),
            line: origin.line,
            column: origin.column,
            step: format!("{}/{}", self.step, self.total.load(Ordering::Relaxed)),
            text: origin.text.clone(),
            msg: msg.into(),
            source_line: self.source_line(origin.line),
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
        let stage =
            self.req.graph.stage(index).ok_or_else(|| {
                BuildError::Other(format!("stage {} is not in the op graph", index))
            })?;
        let label = if self.req.show_platform {
            format!("{} stage-{}", self.platform.spec(), stage.label())
        } else {
            format!("stage-{}", stage.label())
        };
        self.step = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.req.reporter.step(
            self.step,
            self.total.load(Ordering::Relaxed),
            &label,
            &stage.origin.text,
        );
        let started = Instant::now();
        let mut parent_volatile = false;
        let (mut state, base_key) = match &stage.source {
            Source::Scratch => {
                let p = &self.platform;
                (
                    ImageState::scratch(&p.os, &p.architecture, p.variant.as_deref()),
                    CacheKey::base(stage.source.identity(p)),
                )
            }
            Source::Stage(i) => {
                let parent = self.results.lock().ok().and_then(|r| {
                    r.get(i).map(|p| {
                        parent_volatile = p.volatile;
                        (p.state.clone(), p.key.clone())
                    })
                });
                parent.ok_or_else(|| {
                    BuildError::Other(format!("stage {} was not built before stage {}", i, index))
                })?
            }
            Source::Image { reference, image } => {
                self.trace_image(reference, &image.manifest_digest.to_string());
                (
                    image.state.clone(),
                    CacheKey::base(stage.source.identity(&self.platform)),
                )
            }
        };
        for e in &stage.base_edits {
            e.apply(&mut state);
        }
        self.volatile = parent_volatile;
        let base_name = match &stage.source {
            Source::Scratch => "scratch".to_string(),
            Source::Stage(i) => format!(
                "stage:{}",
                self.req
                    .graph
                    .stage(*i)
                    .map(|s| s.label())
                    .unwrap_or_else(|| i.to_string())
            ),
            Source::Image { reference, .. } => reference.clone(),
        };
        if let Ok(mut t) = self.trace.lock() {
            t.stages.insert(index, (stage.label(), base_name));
        }
        self.req.reporter.done(self.step, started.elapsed(), false);
        // Everything that shapes layer bytes and timestamps is part of the first key.
        let mut key = CacheKey::chain(
            &base_key,
            json!({
                "ops": crate::plan::OP_KEY_VERSION,
                "epoch": self.req.epoch,
                "compression": self.req.compression.key(),
                // An arm64 step never hits an amd64 entry, whatever the base.
                "platform": self.platform.spec(),
                "base_edits": stage.base_edits,
            }),
        );
        let use_cache = !self.req.no_cache
            && !self
                .req
                .no_cache_filter
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&stage.label()) || *f == index.to_string());

        let mut view: Option<RootView> = None;
        let mut pending: Vec<String> = Vec::new();
        let stage_name = stage.label();
        for (step_in_stage, op) in stage.ops.iter().enumerate() {
            self.step = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
            self.req.reporter.step(
                self.step,
                self.total.load(Ordering::Relaxed),
                &label,
                &op.origin.text,
            );
            let started = Instant::now();
            if !op.is_layered() {
                // Config ops are cheap: apply now; they enter the key at the next layer
                // op or the stage's end.
                self.apply(op, &mut state, &mut view)?;
                pending.push(op.cache_key().to_string());
                self.req.reporter.done(self.step, started.elapsed(), false);
                continue;
            }
            key = key_config_ops(key, &mut pending);
            self.inputs.clear();
            self.source_stats = None;
            let inputs = self.inputs_of(op)?;
            key = CacheKey::chain(
                &key,
                json!({"op": op.cache_key().to_string(), "inputs": inputs}),
            );
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
                    line: op.origin.line,
                    op: op.origin.text.clone(),
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
            let need = view_need(op);
            // What the stage's next layered step reads of this one's layer is unpacked from
            // the layer's own stream as it is written, instead of from the blob afterwards.
            self.snapshot_ahead = match (self.snapshotter, &op.action) {
                (Snapshotter::Overlay, Action::Copy(_) | Action::Mkdir(_)) => stage.ops
                    [step_in_stage + 1..]
                    .iter()
                    .find(|o| o.is_layered())
                    .map(|next| (chain_ids(&state.layers).pop(), view_need(next))),
                _ => None,
            };
            let outcome = self
                .sync_view(&mut view, &state, need)
                .and_then(|_| self.apply(op, &mut state, &mut view));
            self.snapshot_ahead = None;
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
        let key = key_config_ops(key, &mut pending);
        Ok(StageResult {
            state,
            key,
            view,
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
            layers: crate::registry::pull::Layers::WhenNeeded,
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

    /// Create or grow `view` to show `state`'s layers, as much of them as `need` says.
    fn sync_view(
        &self,
        view: &mut Option<RootView>,
        state: &ImageState,
        need: ViewNeed,
    ) -> Result<(), BuildError> {
        match view {
            Some(v) => v
                .sync_for(&self.snaps, &state.layers, need)
                .map_err(|e| BuildError::Other(e.to_string())),
            None => {
                *view = Some(self.view(&state.layers, need)?);
                Ok(())
            }
        }
    }

    fn history(&self, state: &mut ImageState, op: &Op, layer: Option<LayerRef>) {
        if let Some(created_by) = &op.history {
            state.push_history(&self.created, created_by, layer);
        }
    }

    /// Apply `op` to `state`: its config edits, its action, its history entry.
    fn apply(
        &mut self,
        op: &Op,
        state: &mut ImageState,
        view_slot: &mut Option<RootView>,
    ) -> Result<(), BuildError> {
        for e in &op.edits {
            e.apply(state);
        }
        let layer = match &op.action {
            Action::Config => None,
            Action::Mkdir(m) => {
                let rootfs = view_path(view_slot);
                Some(self.mkdir(op, m, &rootfs)?)
            }
            Action::Copy(c) => {
                let rootfs = view_path(view_slot);
                Some(self.copy(op, c, &rootfs)?)
            }
            Action::Exec(e) => {
                let view = view_slot
                    .as_mut()
                    .ok_or_else(|| BuildError::Other("internal: RUN without a root view".into()))?;
                Some(self.exec(op, e, view)?)
            }
        };
        self.history(state, op, layer);
        Ok(())
    }

    /// WORKDIR's layer: empty when the directory exists, else the directory and its missing
    /// parents, owned by the op's user.
    fn mkdir(&mut self, op: &Op, m: &MkdirOp, rootfs: &Path) -> Result<LayerRef, BuildError> {
        let exists = unpack::resolve_in_root(rootfs, Path::new(m.dir.trim_start_matches('/')))
            .map(|p| p.is_dir())
            .unwrap_or(false);
        if exists {
            return self.commit_tree(op, &crate::oci::tree::LayerTree::default());
        }
        let owner = match &m.owner {
            Some(u) => Some(users::resolve_user(rootfs, u).map_err(|e| self.fail(&op.origin, e))?),
            None => None,
        };
        let staged = copy::stage(&copy::CopyPlan {
            sources: Vec::new(),
            dest: format!("{}/", m.dir),
            root: &SourceRoot {
                root: rootfs.to_path_buf(),
                ignore: IgnoreMatcher::default(),
                is_context: false,
            },
            owner,
            chmod: None,
            parents: false,
            excludes: Vec::new(),
            is_add: false,
            unpack: None,
            checksum: None,
            rootfs,
            epoch: self.req.epoch,
            known: None,
        })
        .map_err(|e| self.fail(&op.origin, e.to_string()))?;
        self.commit_tree(op, &staged.tree)
    }

    fn copy(&mut self, op: &Op, c: &CopyOp, rootfs: &Path) -> Result<LayerRef, BuildError> {
        let owner = match &c.chown {
            Some(spec) => {
                Some(users::resolve_chown(rootfs, spec).map_err(|e| self.fail(&op.origin, e))?)
            }
            None => None,
        };
        let root = match &c.from {
            Input::Context => self.context_root(),
            from => SourceRoot {
                root: self.source_for(&op.origin, from)?,
                ignore: IgnoreMatcher::default(),
                is_context: false,
            },
        };
        let plan = copy::CopyPlan {
            sources: c.sources.clone(),
            dest: c.dest.clone(),
            root: &root,
            owner,
            chmod: c.chmod.clone(),
            parents: c.parents,
            excludes: c.excludes.clone(),
            is_add: c.is_add,
            unpack: c.unpack,
            checksum: c.checksum.clone(),
            rootfs,
            epoch: self.req.epoch,
            known: match c.from {
                Input::Context => self.source_stats.as_ref(),
                _ => None,
            },
        };
        let staged = copy::stage(&plan).map_err(|e| self.fail(&op.origin, e.to_string()))?;
        if c.checksum.is_none() {
            for (url, digest) in &staged.fetched {
                self.trace_url(url, digest);
            }
        }
        for s in &staged.skipped {
            self.req.reporter.warn(&format!(
                "{}:{}: {}: skipped {}: only files, directories and symlinks are copied",
                self.req.file_name, op.origin.line, op.origin.text, s
            ));
        }
        self.commit_tree(op, &staged.tree)
    }

    /// Run one exec op in the sandbox; returns its layer.
    fn exec(&mut self, op: &Op, e: &ExecOp, view: &mut RootView) -> Result<LayerRef, BuildError> {
        let origin = &op.origin;
        let rootfs_path = view.path().to_path_buf();
        let rootfs = rootfs_path.as_path();
        if let Err(e) = worker::sandbox::emulation::check(&self.platform.architecture) {
            return Err(self.fail(origin, e));
        }
        if !is_root() {
            return Err(self.fail(origin, "RUN needs root or an unprivileged user namespace, and neither is available here (see the warning above)"));
        }
        let (uid, gid, groups, home) =
            run::resolve_step_user(rootfs, e.user.as_deref()).map_err(|m| self.fail(origin, m))?;
        let mut env = e.env.clone();
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), home.unwrap_or_else(|| "/root".into())));
        }
        let (network, insecure) = self.sandbox_of(origin, e)?;
        let scratch = self.store.scratch_dir("run-")?;
        let process_sandbox = match self.kept {
            Some(_) => true,
            None => self.process_sandbox(origin, scratch.path())?,
        };

        // /etc files provided for the step, never captured.
        let etc = scratch.path().join("etc");
        fs::create_dir_all(&etc).map_err(|e| self.fail(origin, e.to_string()))?;
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
            fs::write(&p, data).map_err(|e| self.fail(origin, e.to_string()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                .map_err(|e| self.fail(origin, e.to_string()))?;
            etc_files.push((p, format!("/etc/{}", name)));
        }

        // RUN --mount.
        let ctx_root = self.context_root();
        let mut guards = run::MountGuards::default();
        let mut from_err = None;
        let cache_mounts = self.store.dir(Bucket::CacheMounts);
        let secrets = self.req.secrets.clone();
        let copy_context = self.kept.is_some();
        let (mut mounts, secret_env) = {
            let mut lookup = |f: &Input| -> Result<PathBuf, String> {
                match self.source_for(origin, f) {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        let m = e.to_string();
                        from_err = Some(e);
                        Err(m)
                    }
                }
            };
            let mut me = run::MountEnv {
                cache_mounts: &cache_mounts,
                scratch: scratch.path(),
                context: &ctx_root,
                secrets: &secrets,
                from_root: &mut lookup,
                copy_context,
            };
            match run::resolve_mounts(&e.mounts, &mut me, &mut guards) {
                Ok(x) => x,
                Err(m) => return Err(from_err.unwrap_or_else(|| self.fail(origin, m))),
            }
        };
        env.extend(secret_env);
        if let Some(body) = &e.script {
            let p = scratch.path().join("script");
            fs::write(&p, body).map_err(|e| self.fail(origin, e.to_string()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                .map_err(|e| self.fail(origin, e.to_string()))?;
            mounts.push(worker::ExtraMount::Bind {
                source: p,
                target: crate::plan::HEREDOC_SCRIPT_PATH.into(),
                readonly: true,
            });
        }

        let spec = worker::RunSpec {
            root: worker::sandbox::RootMount::Bind {
                dir: PathBuf::new(),
            },
            argv: e.argv.clone(),
            env,
            cwd: e.cwd.clone(),
            uid,
            gid,
            groups,
            hostname: "builder".into(),
            network,
            insecure,
            etc_files,
            mounts,
            executor: self.req.executor.clone(),
            process_sandbox,
        };
        let step_dir = scratch.path().join("step");
        fs::create_dir_all(&step_dir).map_err(|e| self.fail(origin, e.to_string()))?;
        let mut tail = run::Tail::new(12);
        let reporter = self.req.reporter;
        let step = self.step;
        let (exit, diff) = worker::run_step(
            worker::StepInput {
                view: &*view,
                scratch: &step_dir,
                spec,
                in_place: self.kept.as_ref(),
            },
            &mut |line| {
                reporter.log(step, line);
                tail.push(line);
            },
        )
        .map_err(|e| self.fail(origin, e.to_string()))?;
        for n in worker::inplace::take_notices() {
            reporter.warn(&n);
        }
        drop(guards);
        match exit {
            Exit::Code(0) => {}
            Exit::Code(c) => {
                return Err(self.fail(origin, format!("exit code {}{}", c, tail.render())))
            }
            Exit::Signal(s) => {
                return Err(self.fail(
                    origin,
                    format!(
                        "killed by {}{}",
                        worker::sandbox::signal_name(s),
                        tail.render()
                    ),
                ))
            }
        }
        self.commit_layer(op, &diff, view)
    }

    /// Whether RUN gets its own PID namespace and /proc here (`false`: the relaxed sandbox,
    /// said once and recorded), or why RUN cannot be sandboxed at all.
    fn process_sandbox(&self, origin: &Origin, scratch: &Path) -> Result<bool, BuildError> {
        let hint = || {
            match worker::inplace::detect_container() {
            Some(c) => format!(
                "builder runs in {}, which allows no new namespaces: use --isolation container, where the container itself is the sandbox",
                c
            ),
            None => "run builder as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0)".to_string(),
        }
        };
        if let Some(why) = &self.sandbox_unavailable {
            return Err(self.fail(
                origin,
                format!("RUN cannot be sandboxed: {}; {}", why, hint()),
            ));
        }
        let probed = self.sh.process_sandbox.get_or_init(|| {
            let r = worker::sandbox::probe_process_sandbox(scratch);
            if let Ok(false) = r {
                self.req.reporter.warn("a fresh /proc cannot be mounted here (a container's /proc has masked paths): RUN steps share builder's PID namespace and see its /proc read-only, as BuildKit's no-process-sandbox mode does; the provenance records it");
                if let Ok(mut t) = self.trace.lock() {
                    t.isolation = worker::NO_PROCESS_SANDBOX.to_string();
                }
            }
            r
        });
        match probed {
            Ok(full) => Ok(*full),
            Err(e) => Err(self.fail(
                origin,
                format!("RUN cannot be sandboxed: {}; {}", e, hint()),
            )),
        }
    }

    /// The step's network and whether it runs insecure, refused unless the build holds the
    /// entitlement (checked for cached steps too, as BuildKit checks the whole definition).
    fn sandbox_of(
        &self,
        origin: &Origin,
        e: &ExecOp,
    ) -> Result<(worker::sandbox::NetworkMode, bool), BuildError> {
        use worker::sandbox::NetworkMode;
        let network = match e.network {
            Network::Sandbox => NetworkMode::Private,
            Network::None => NetworkMode::Loopback,
            Network::Host => {
                if !self.req.entitlements.network_host {
                    return Err(self.fail(
                        origin,
                        "network host is not allowed: start the build with --allow network.host",
                    ));
                }
                NetworkMode::Host
            }
        };
        if e.insecure && !self.req.entitlements.security_insecure {
            return Err(self.fail(
                origin,
                "--security=insecure is not allowed: start the build with --allow security.insecure",
            ));
        }
        Ok((network, e.insecure))
    }

    /// What a layer op reads, as it stands now: the digest of the context files it reads,
    /// the keys of the stages and the digests of the images it copies or mounts from. With
    /// the op's own key this decides its result.
    fn inputs_of(&mut self, op: &Op) -> Result<Value, BuildError> {
        let origin = &op.origin;
        let mut m = json!({});
        match &op.action {
            Action::Copy(c) => {
                match &c.from {
                    Input::Context => {
                        let excludes = IgnoreMatcher::new(&c.excludes)
                            .map_err(|e| self.fail(origin, format!("--exclude: {}", e)))?;
                        m["context"] = json!(self.context_digest(origin, &c.paths(), &excludes)?);
                    }
                    from => m["from"] = json!(self.identity_of(origin, from)?),
                }
                if let Some(sum) = &c.checksum {
                    let urls: Vec<String> = c.urls().cloned().collect();
                    for u in urls {
                        self.trace_url(&u, sum);
                    }
                } else if c.fetches_unpinned() {
                    // Remote content is unknown until fetched: never reuse such a step.
                    self.volatile = true;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default();
                    m["uncacheable"] = json!(now.to_string());
                }
            }
            Action::Exec(e) => {
                let args: BTreeMap<&String, &String> = e.args.iter().map(|(k, v)| (k, v)).collect();
                self.inputs.push(json!({ "args": args }));
                self.sandbox_of(origin, e)?;
                let mut mounts = Vec::new();
                for mount in &e.mounts {
                    let mut entry = json!({});
                    if mount.kind == MountKind::Bind {
                        match &mount.from {
                            Input::Context => {
                                let src = mount.source.clone().unwrap_or_else(|| ".".into());
                                entry["context"] = json!(self.context_digest(
                                    origin,
                                    &[src],
                                    &IgnoreMatcher::default()
                                )?);
                            }
                            from => entry["from"] = json!(self.identity_of(origin, from)?),
                        }
                    }
                    mounts.push(entry);
                }
                m["mounts"] = json!(mounts);
            }
            Action::Mkdir(_) | Action::Config => {}
        }
        Ok(m)
    }

    /// What a `--from` stands for in a key: a stage's result key, or an image's digest.
    fn identity_of(&mut self, origin: &Origin, from: &Input) -> Result<String, BuildError> {
        match from {
            Input::Context => Ok("context".into()),
            Input::Stage(i) => {
                let found = self
                    .results
                    .lock()
                    .ok()
                    .and_then(|r| r.get(i).map(|r| (r.key.0.to_string(), r.volatile)));
                self.volatile |= found.as_ref().is_some_and(|(_, v)| *v);
                let key = found.map(|(k, _)| k);
                let name = self.stage_label(*i);
                if let Some(k) = &key {
                    self.inputs.push(json!({"stage": name, "key": k}));
                }
                key.map(|k| format!("stage:{}", k)).ok_or_else(|| {
                    self.fail(
                        origin,
                        format!("stage {} is not built before this step", name),
                    )
                })
            }
            Input::Image(r) => {
                let external = self.external_image(origin, r)?;
                let digest = external
                    .get(r)
                    .map(|x| x.image.manifest_digest.to_string())
                    .unwrap_or_default();
                drop(external);
                self.trace_image(r, &digest);
                self.inputs.push(json!({"image": r, "digest": digest}));
                Ok(format!("image:{}", digest))
            }
        }
    }

    fn stage_label(&self, index: usize) -> String {
        self.req
            .graph
            .stage(index)
            .map(|s| s.label())
            .unwrap_or_else(|| index.to_string())
    }

    /// The external images, with `from` fetched (once per build).
    fn external_image(
        &self,
        origin: &Origin,
        from: &str,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, ExternalImage>>, BuildError> {
        let mut external = self
            .external
            .lock()
            .map_err(|_| BuildError::Other("a stage thread panicked".into()))?;
        if !external.contains_key(from) {
            let image = self
                .fetch_image(from)
                .map_err(|e| self.fail(origin, e.to_string()))?;
            external.insert(from.to_string(), ExternalImage { image, view: None });
        }
        Ok(external)
    }

    /// The files an input names: the context, an earlier stage's root filesystem, or an
    /// image's.
    fn source_for(&mut self, origin: &Origin, from: &Input) -> Result<PathBuf, BuildError> {
        match from {
            Input::Context => Ok(self.req.context.clone()),
            Input::Stage(i) => {
                // A finished stage's root, viewed (and brought up to date) on first use.
                let mut results = self
                    .results
                    .lock()
                    .map_err(|_| BuildError::Other("a stage thread panicked".into()))?;
                let Some(r) = results.get_mut(i) else {
                    drop(results);
                    let name = self.stage_label(*i);
                    return Err(self.fail(
                        origin,
                        format!("stage {} is not built before this step", name),
                    ));
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
                outcome.map_err(|e| self.fail(origin, e))
            }
            Input::Image(r) => {
                let mut external = self.external_image(origin, r)?;
                let Some(x) = external.get_mut(r) else {
                    return Err(BuildError::Other(format!(
                        "internal: image {} was not fetched",
                        r
                    )));
                };
                if x.view.is_none() {
                    x.view = Some(self.view(&x.image.state.layers, ViewNeed::Full)?);
                }
                Ok(x.view
                    .as_ref()
                    .map(|v| v.path().to_path_buf())
                    .unwrap_or_default())
            }
        }
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
        origin: &Origin,
        sources: &[String],
        excludes: &IgnoreMatcher,
    ) -> Result<String, BuildError> {
        let root = self.context_root();
        let mut entries = Vec::new();
        let mut ends = Vec::new();
        for src in sources {
            let mut one = root
                .enumerate(std::slice::from_ref(src), excludes)
                .map_err(|e| self.fail(origin, e.to_string()))?;
            entries.append(&mut one);
            ends.push(entries.len());
        }
        let statted = self
            .hasher
            .stat_all(&entries)
            .map_err(|e| self.fail(origin, e.to_string()))?;
        // A read of entries that all look as they did when this read last ran takes what it
        // recorded then.
        let owner = self.context_owner();
        let mut slot =
            std::os::unix::ffi::OsStrExt::as_bytes(self.req.context.as_os_str()).to_vec();
        for src in sources {
            slot.push(0);
            slot.extend_from_slice(src.as_bytes());
        }
        slot.extend_from_slice(format!("\0{}\0{}:{}", self.req.epoch, owner.0, owner.1).as_bytes());
        let key = self.hasher.listing_key(&statted, &slot, &ends);
        if let Some(r) = key.as_ref().and_then(|k| self.hasher.recall(&slot, k)) {
            if r.sources.len() == sources.len() {
                for (src, d) in sources.iter().zip(&r.sources) {
                    self.inputs.push(json!({"context": src, "digest": d}));
                }
                if let Ok(mut t) = self.trace.lock() {
                    t.context.push(r.listing);
                }
                crate::cache::free_aside((entries, statted));
                return Ok(r.digest);
            }
        }
        let (digest, leaves, stats) = self
            .hasher
            .describe_leaves(&entries, &statted.stats, self.req.epoch, owner)
            .map_err(|e| self.fail(origin, e.to_string()))?;
        drop(statted);
        let mut source_digests = Vec::with_capacity(sources.len());
        let mut start = 0;
        for (src, end) in sources.iter().zip(ends) {
            let covered = entries[start..end]
                .iter()
                .map(|(rel, _)| rel)
                .zip(&leaves[start..end]);
            let d = crate::attest::trace::leaves_digest(covered).to_string();
            self.inputs.push(json!({"context": src, "digest": d}));
            source_digests.push(d);
            start = end;
        }
        let (rels, paths): (Vec<String>, Vec<PathBuf>) = entries.into_iter().unzip();
        if let Some(stats) = stats {
            self.source_stats
                .get_or_insert_with(HashMap::new)
                .extend(paths.into_iter().zip(stats));
        }
        // The listing is only read once the stage is done (by provenance, and by the next
        // build): it is made beside the step, in its place in the trace.
        let mut trace = self.lock_trace()?;
        let place = trace.context.len();
        trace.context.push(ContextListing::of(&BTreeMap::new()));
        drop(trace);
        let keep = key.map(|key| (self.hasher.listing_slot(&slot), key, digest.clone()));
        let job = std::thread::spawn(move || {
            let listing = listing_of(rels, leaves);
            if let Some((slot, key, digest)) = keep {
                slot.remember(
                    &key,
                    &crate::cache::context_hash::Remembered {
                        digest,
                        sources: source_digests,
                        listing: listing.clone(),
                    },
                );
            }
            listing
        });
        self.listings.push((place, job));
        Ok(digest)
    }

    /// The build's trace, for a change that must not be lost.
    fn lock_trace(&self) -> Result<std::sync::MutexGuard<'_, BuildTrace>, BuildError> {
        self.trace
            .lock()
            .map_err(|_| BuildError::Other("internal: the build trace is poisoned".into()))
    }

    /// Put the listings made beside this stage's steps in their places in the trace.
    fn settle_listings(&mut self) -> Result<(), BuildError> {
        for (place, job) in std::mem::take(&mut self.listings) {
            let listing = job
                .join()
                .map_err(|_| BuildError::Other("internal: a context listing failed".into()))?;
            if let Some(slot) = self.lock_trace()?.context.get_mut(place) {
                *slot = listing;
            }
        }
        Ok(())
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

    /// A view of `layers` with this build's snapshotter, showing what `need` says.
    fn view(&self, layers: &[LayerRef], need: ViewNeed) -> Result<RootView, BuildError> {
        RootView::for_need(&self.snaps, self.snapshotter, layers, need)
            .map_err(|e| BuildError::Other(e.to_string()))
    }

    /// Write a layer described as a tree. The stage's view catches up lazily, only when a
    /// later step needs the filesystem.
    fn commit_tree(
        &mut self,
        op: &Op,
        tree: &crate::oci::tree::LayerTree,
    ) -> Result<LayerRef, BuildError> {
        let mut ahead = self.snapshot_ahead.take().and_then(|(below, need)| {
            let staged = self.snaps.stage(need).ok()?;
            let unpacker =
                unpack::StreamUnpacker::start(&op.origin.text, &staged.dir, staged.options).ok()?;
            // A tuple drops its fields in order: on failure the unpacking thread is joined
            // before its directory is removed.
            Some((below, unpacker, staged))
        });
        let layer = self.write_step_layer(
            op,
            crate::oci::layer::LayerSource::Tree(tree),
            ahead.as_mut().map(|(_, u, _)| u as &mut dyn Write),
        )?;
        // The snapshot is a shortcut: if it could not be made, the blob is unpacked later.
        if let Some((below, unpacker, staged)) = ahead {
            if unpacker.finish().is_ok() {
                let chain = next_chain(below.as_ref(), &layer.diff_id);
                let _ = self.snaps.publish_staged(&chain, staged);
            }
        }
        Ok(layer.into())
    }

    /// Turn a staged tree into a layer and put it on the stage's view; the tree itself
    /// becomes the layer's snapshot.
    fn commit_layer(
        &self,
        op: &Op,
        staging: &Path,
        view: &mut RootView,
    ) -> Result<LayerRef, BuildError> {
        let layer =
            self.write_step_layer(op, crate::oci::layer::LayerSource::Dir(staging), None)?;
        let layer: LayerRef = layer.into();
        view.add_layer_from_dir(&self.snaps, &layer, staging)
            .map_err(|e| self.fail(&op.origin, e.to_string()))?;
        Ok(layer)
    }

    /// Write the layer of `op`. A gzip layer reuses the compressed chunks that the last
    /// layer of the same step (platform and instruction text) shares with it, and says how
    /// many it compressed.
    fn write_step_layer(
        &self,
        op: &Op,
        source: crate::oci::layer::LayerSource,
        tee: Option<&mut dyn Write>,
    ) -> Result<crate::oci::layer::Layer, BuildError> {
        // Only a hint of which earlier blob to look in: reused chunks are matched by content.
        let identity = format!("{}\0{}", self.platform.spec(), op.origin.text);
        let chunks = self.store.dir(Bucket::Chunks);
        let segment_dir = self.store.dir(Bucket::Segments);
        let previous =
            crate::cache::chunks::PreviousChunks::of_step(&chunks, &self.store.blobs, &identity);
        // The SBOM's look at this layer is taken as it is written.
        let mut scanner = crate::attest::sbom::StreamScanner::default();
        let segments = crate::cache::segments::SegmentDir::open(&segment_dir);
        let layer = crate::oci::layer::write_layer_from(
            &self.store.blobs,
            source,
            LayerOptions {
                compression: self.req.compression,
                epoch: Some(self.req.epoch),
                reuse: previous
                    .as_ref()
                    .map(|p| p as &dyn crate::oci::pgzip::ChunkReuse),
                segments: Some(&segments),
            },
            Some(&mut Fanout(&mut scanner, tee)),
        )
        .map_err(|e| self.fail(&op.origin, e.to_string()))?;
        if let Some(scan) = scanner.finish() {
            crate::attest::sbom::store_scan(&self.store.dir(Bucket::Sbom), &layer.diff_id, &scan);
        }
        crate::cache::segments::remember(&segment_dir, &layer.digest, &layer.segments);
        if !layer.segments.is_empty() {
            self.req.reporter.log(
                self.step,
                &format!(
                    "layer {}: {} tar segments, {} read from earlier layers",
                    layer.digest,
                    layer.segments.len(),
                    layer.segments_reused
                ),
            );
        }
        if let Compression::Gzip(level) = self.req.compression {
            crate::cache::chunks::remember(&chunks, &identity, &layer, level);
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
}

/// The listing of one context read: its leaves by path. Sorted here and merged in one pass
/// (a large context's leaves, inserted one by one, cost a tree descent each); where a path
/// is listed twice, the later listing wins, as it would by insertion.
fn listing_of(rels: Vec<String>, leaves: Vec<ContextLeaf>) -> ContextListing {
    let mut listed: Vec<(String, ContextLeaf)> = rels.into_iter().zip(leaves).collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    listed.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(&mut later.1, &mut kept.1);
        }
        same
    });
    let listed: BTreeMap<String, ContextLeaf> = listed.into_iter().collect();
    ContextListing::of(&listed)
}

/// A layer's tar, seen by the SBOM scanner and, when given, one more reader.
struct Fanout<'a, 'b>(&'a mut dyn Write, Option<&'b mut dyn Write>);

impl Write for Fanout<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        if let Some(w) = self.1.as_mut() {
            w.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `op` reads of its root: only RUN reads file contents; COPY and WORKDIR look up paths.
fn view_need(op: &Op) -> ViewNeed {
    match op.action {
        Action::Exec(_) => ViewNeed::Full,
        _ => ViewNeed::Metadata,
    }
}

/// The path of a stage's view (empty before one exists: a first op on scratch sees nothing).
fn view_path(view: &Option<RootView>) -> PathBuf {
    view.as_ref()
        .map(|v| v.path().to_path_buf())
        .unwrap_or_default()
}
