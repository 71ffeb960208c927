//! What a stage's steps share: the build's state (store, request, worker, caches, stage
//! results, the trace) and the stage's own (its platform, the step it is on, what the step
//! read). Runners and the stage loop reach the build through it: failures located at an op's
//! origin, the files an input names, images fetched once, what the provenance records.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::environment::{Environment, Worker};
use super::explain::BuildRecord;
use super::inputs::StepInput;
use super::schedule::InFlight;
use super::{BuildError, BuildRequest, StepRecord};
use crate::attest::trace::{BuildTrace, ContextListing};
use crate::cache::context_hash::ContextHasher;
use crate::cache::{CacheIndex, CacheKey};
use crate::context::SourceRoot;
use crate::oci::at::SourceStat;
use crate::oci::digest::Digest;
use crate::oci::image::{rfc3339, ImageState, LayerRef, StoredImage};
use crate::oci::platform::Platform;
use crate::plan::{Input, Origin};
use crate::store::{sources, Bucket, Store, StoreError, StoreFile};
use crate::worker::snapshots::{RootView, Snapshots, ViewNeed};
use crate::worker::{self, Snapshotter};

/// A finished stage.
pub(super) struct StageResult {
    pub state: ImageState,
    /// The key of the stage's last step: what `COPY --from` and `FROM <stage>` key on.
    pub key: CacheKey,
    pub view: Option<RootView>,
    /// See `Ctx::volatile`.
    pub volatile: bool,
    /// How many layers and history entries the stage's base has (what `--squash` keeps).
    pub base_layers: usize,
    pub base_history: usize,
}

/// What all stages of one build share (stages run on their own threads).
pub(super) struct Shared<'a> {
    pub store: &'a Store,
    pub req: &'a BuildRequest<'a>,
    pub worker: &'a dyn Worker,
    pub flight: &'a InFlight,
    pub results: Mutex<BTreeMap<usize, StageResult>>,
    pub created: String,
    /// Steps started so far (the `#N` of progress lines).
    pub counter: AtomicUsize,
    pub total: AtomicUsize,
    /// Images named by `--from` that are not stages: fetched once, viewed when read.
    external: Mutex<BTreeMap<String, ExternalImage>>,
    pub snapshotter: Snapshotter,
    pub snaps: Snapshots,
    pub cache: CacheIndex,
    pub hasher: ContextHasher,
    /// Layered steps with their keys, as they complete.
    pub steps: Mutex<Vec<StepRecord>>,
    /// What the build read and did, for provenance.
    pub trace: Mutex<BuildTrace>,
    /// Why RUN cannot have builder's sandbox here (no namespace could be made).
    pub sandbox_unavailable: Option<String>,
    /// Whether a step gets its own PID namespace and /proc (else the relaxed sandbox),
    /// probed at the first RUN.
    pub process_sandbox: OnceLock<Result<bool, String>>,
    /// `--isolation container`: what a step's layout never touches.
    pub kept: Option<worker::inplace::Kept>,
    /// The last build of this build file and target, and this build's record of the same.
    /// (Read at the first miss: a build whose steps all hit never reads it.)
    previous: OnceLock<Option<BuildRecord>>,
    /// That record, being read ahead of the first miss ([`Shared::read_previous_ahead`]).
    previous_ahead: Mutex<Option<std::thread::JoinHandle<Option<BuildRecord>>>>,
    pub record: Mutex<BuildRecord>,
    /// Whether any step ran (else the last record still holds).
    pub ran: std::sync::atomic::AtomicBool,
}

/// An image a `--from` names.
struct ExternalImage {
    image: StoredImage,
    view: Option<RootView>,
}

/// One stage's view of the build: the shared parts plus the step it is on.
pub(super) struct Ctx<'s, 'a> {
    pub sh: &'s Shared<'a>,
    pub step: usize,
    /// The platform this stage builds for: its `FROM --platform`, else the build's.
    pub platform: Platform,
    /// What the current step read: its key's material and its provenance record.
    pub inputs: Vec<StepInput>,
    /// Whether this stage's key chain holds a key that never repeats (an ADD of a URL
    /// without `--checksum`): provenance then leaves the keys out, as they say nothing.
    pub volatile: bool,
    /// The `lstat` of each context file the current step's key was computed from, when
    /// one had changed (the step will likely run): its COPY takes them instead of stating
    /// every file again.
    pub source_stats: Option<HashMap<PathBuf, SourceStat>>,
    /// The snapshot the next step will read of the current step's layer (its kind, and the
    /// chain below the layer), made from the layer's tar as it is written.
    pub snapshot_ahead: Option<(Option<Digest>, ViewNeed)>,
    /// The stage's base as the build record keeps it, and as a miss's reason names its
    /// change.
    pub base: (String, String),
    /// Whether the stage has had a layered step yet.
    pub layered_yet: bool,
    /// The layers the current step runs on (what a failed RUN's kept state is laid over),
    /// and the stage's label.
    pub layers_below: Vec<LayerRef>,
    pub label: String,
    /// Context listings still being written out on threads of their own (a large context's
    /// takes tens of ms, which the step's staging and layer writing need not wait for), with
    /// where each goes in the trace.
    pub listings: Vec<(
        Option<String>,
        usize,
        std::thread::JoinHandle<ContextListing>,
    )>,
}

impl<'a> std::ops::Deref for Ctx<'_, 'a> {
    type Target = Shared<'a>;
    fn deref(&self) -> &Shared<'a> {
        self.sh
    }
}

impl<'a> Shared<'a> {
    /// The record of the last build of this build file and target, if there is one.
    pub fn previous(&self) -> Option<&BuildRecord> {
        self.previous
            .get_or_init(|| {
                let ahead = self.previous_ahead.lock().ok().and_then(|mut a| a.take());
                match ahead.map(|h| h.join()) {
                    Some(Ok(record)) => record,
                    _ => super::explain::load(self.store, self.req),
                }
            })
            .as_ref()
    }

    /// Start reading [`Shared::previous`] on a thread: a context read that found a change
    /// is about to miss, and describes its entries meanwhile.
    pub fn read_previous_ahead(&self) {
        if self.previous.get().is_some() {
            return;
        }
        if let Ok(mut ahead) = self.previous_ahead.lock() {
            if ahead.is_none() {
                *ahead = super::explain::load_ahead(self.store, self.req);
            }
        }
    }

    pub fn new(
        store: &'a Store,
        req: &'a BuildRequest<'a>,
        env: Environment,
        worker: &'a dyn Worker,
        flight: &'a InFlight,
    ) -> Shared<'a> {
        let total = req.graph.stages.iter().map(|s| s.ops.len() + 1).sum();
        Shared {
            store,
            req,
            worker,
            flight,
            results: Mutex::new(BTreeMap::new()),
            created: rfc3339(req.epoch),
            counter: AtomicUsize::new(0),
            total: AtomicUsize::new(total),
            external: Mutex::new(BTreeMap::new()),
            snapshotter: env.snapshotter,
            snaps: Snapshots::new(
                &store.dir(Bucket::Snapshots),
                &store.dir(Bucket::Tmp),
                &store.blobs,
            )
            .scanning_into(&store.dir(Bucket::Sbom)),
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
            sandbox_unavailable: env.sandbox_unavailable,
            process_sandbox: OnceLock::new(),
            kept: env.kept,
            previous: OnceLock::new(),
            previous_ahead: Mutex::new(None),
            record: Mutex::new(BuildRecord::default()),
            ran: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Ctx<'_, '_> {
    /// A failure of the current step, located at the op's origin in the build file.
    pub fn fail(&self, origin: &Origin, msg: impl Into<String>) -> BuildError {
        BuildError::at(
            &self.req.file_name,
            origin,
            format!("{}/{}", self.step, self.total.load(Ordering::Relaxed)),
            msg,
        )
    }

    /// Fetch a named or foreign image, pulling as the build's policy says.
    pub fn fetch_image(&self, reference: &str) -> Result<StoredImage, StoreError> {
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

    pub fn stage_label(&self, index: usize) -> String {
        self.req
            .graph
            .stage(index)
            .map(|s| s.label())
            .unwrap_or_else(|| index.to_string())
    }

    /// The digest of the image `from` names (fetched once per build).
    pub fn external_digest(&self, origin: &Origin, from: &str) -> Result<String, BuildError> {
        let external = self.external_image(origin, from)?;
        Ok(external
            .get(from)
            .map(|x| x.image.manifest_digest.to_string())
            .unwrap_or_default())
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

    /// The key and volatility of a finished stage, if it is.
    pub fn stage_key(&self, index: usize) -> Option<(String, bool)> {
        self.results
            .lock()
            .ok()
            .and_then(|r| r.get(&index).map(|r| (r.key.0.to_string(), r.volatile)))
    }

    /// The files an input names: the context, an earlier stage's root filesystem, or an
    /// image's.
    pub fn source_for(&mut self, origin: &Origin, from: &Input) -> Result<PathBuf, BuildError> {
        match from {
            Input::Context => Ok(self.req.context.clone()),
            Input::Local(_) => Ok(self.context_root_of(origin, from)?.root),
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

    /// The layers of a stage or image `from` names, once [`Ctx::source_for`] has had them.
    pub fn layers_of(&self, from: &Input) -> Option<Vec<LayerRef>> {
        match from {
            Input::Context | Input::Local(_) => None,
            Input::Stage(i) => Some(self.results.lock().ok()?.get(i)?.state.layers.clone()),
            Input::Image(r) => Some(
                self.external
                    .lock()
                    .ok()?
                    .get(r)?
                    .image
                    .state
                    .layers
                    .clone(),
            ),
        }
    }

    /// The build context as COPY, ADD and bind mounts read it.
    pub fn context_root(&self) -> SourceRoot {
        SourceRoot::context(self.req.context.clone(), self.req.ignore.clone())
    }

    /// The context `from` names, the build's or a named one, as COPY, ADD and bind mounts
    /// read it.
    pub fn context_root_of(&self, origin: &Origin, from: &Input) -> Result<SourceRoot, BuildError> {
        match from {
            Input::Local(name) => self
                .req
                .named_contexts
                .get(name)
                .cloned()
                .ok_or_else(|| self.fail(origin, format!("no build context named {:?}", name))),
            _ => Ok(self.context_root()),
        }
    }

    /// The build's trace, for a change that must not be lost.
    pub fn lock_trace(&self) -> Result<std::sync::MutexGuard<'_, BuildTrace>, BuildError> {
        self.trace
            .lock()
            .map_err(|_| BuildError::Other("internal: the build trace is poisoned".into()))
    }

    /// Put the listings made beside this stage's steps in their places in the trace.
    pub fn settle_listings(&mut self) -> Result<(), BuildError> {
        for (named, place, job) in std::mem::take(&mut self.listings) {
            let listing = job
                .join()
                .map_err(|_| BuildError::Other("internal: a context listing failed".into()))?;
            if let Some(slot) = self
                .lock_trace()?
                .listings_of(named.as_deref())
                .get_mut(place)
            {
                *slot = listing;
            }
        }
        Ok(())
    }

    /// Record that the build read `url`, whose content has `digest`; returns the step's
    /// input.
    pub fn trace_url(&self, url: &str, digest: &str) -> StepInput {
        if let Ok(mut t) = self.trace.lock() {
            t.urls.insert(url.to_string(), digest.to_string());
        }
        StepInput::Url {
            url: url.to_string(),
            digest: digest.to_string(),
        }
    }

    /// Record that `reference` resolved to the image manifest `digest`.
    pub fn trace_image(&self, reference: &str, digest: &str) {
        if let Ok(mut t) = self.trace.lock() {
            t.images.insert(reference.to_string(), digest.to_string());
        }
    }

    /// A view of `layers` with this build's snapshotter, showing what `need` says.
    pub fn view(&self, layers: &[LayerRef], need: ViewNeed) -> Result<RootView, BuildError> {
        RootView::for_need(&self.snaps, self.snapshotter, layers, need)
            .map_err(|e| BuildError::Other(e.to_string()))
    }
}
