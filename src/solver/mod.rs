//! The solver: runs an op graph's stages (concurrently where they are independent), applies
//! each op to an [`ImageState`], asks the cache before every layer-producing op, writes the
//! layers the ops produce, and commits the target stage as an image. It knows nothing of
//! build-file text: the ops come resolved from the frontend, and a failure names the op's
//! origin for the command line to show.
//!
//! The rooms:
//! - `schedule`: the ready queue of stages and the in-flight dedupe of steps (state of a
//!   [`Solver`], never a process-global);
//! - `stage`: one stage's run, step by step: key, cache, run, record;
//! - `ops`: one runner per op kind (`mkdir`, `copy`, `exec`): its cache map and its run;
//! - `inputs`: the typed step inputs that make both the keys and the provenance records;
//! - `layers`: writing a step's layer (chunks, segments, SBOM scan, snapshot ahead);
//! - `environment`: the [`Worker`] seam, and how the host's worker sets up (snapshotter,
//!   user and mount namespaces, `--isolation container`);
//! - `staging`, `mounts`, `users`: COPY's tree, RUN's mounts, names in the image.

mod cx;
mod environment;
pub mod error;
pub mod explain;
pub mod failures;
mod inputs;
mod layers;
pub mod mounts;
mod ops;
mod reads;
pub mod schedule;
pub mod ssh;
mod stage;
pub mod staging;
pub mod users;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::attest::trace::BuildTrace;
use crate::cache::remote::RemoteCache;
use crate::context::IgnoreMatcher;
use crate::oci::digest::Digest;
use crate::oci::image::StoredImage;
use crate::oci::layer::Compression;
use crate::oci::platform::Platform;
use crate::plan::OpGraph;
use crate::progress::Reporter;
use crate::registry::{Client, PullPolicy};
use crate::store::Store;
use crate::worker;

pub use crate::cache::StepRecord;
pub use environment::{enter_debug_host, Environment, HostWorker, Worker};
pub use error::{BuildError, StepFailure};

/// Everything a build needs besides the store.
#[derive(Clone)]
pub struct BuildRequest<'a> {
    /// The build file's name, for locating errors.
    pub file_name: String,
    pub graph: OpGraph,
    pub context: PathBuf,
    pub ignore: IgnoreMatcher,
    /// `--build-context NAME=DIR`s, by looked-up name, each with its own `.dockerignore`.
    pub named_contexts: BTreeMap<String, crate::context::SourceRoot>,
    pub epoch: i64,
    pub compression: Compression,
    /// `--force-compression`: the image's inherited layers too are compressed as
    /// `compression` says (not only the layers the build writes).
    pub force_compression: bool,
    /// `--squash`: the target stage's layers since its base become one.
    pub squash: bool,
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
    pub secrets: BTreeMap<String, mounts::SecretSource>,
    /// `--ssh`: each id's agent socket.
    pub ssh: BTreeMap<String, PathBuf>,
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
    /// `--explain-against`: the image whose build a step that misses is compared with,
    /// instead of the last build's.
    pub explain_against: Option<Digest>,
    /// `--label`: labels set on the image, after the target stage's own.
    pub labels: Vec<(String, String)>,
}

/// BuildKit's entitlements: what a build may do that weakens the RUN sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entitlements {
    /// `--allow network.host`: `--network=host` for the build or a step.
    pub network_host: bool,
    /// `--allow security.insecure`: `RUN --security=insecure`.
    pub security_insecure: bool,
}

/// What a build made, and how.
pub struct Outcome {
    pub image: StoredImage,
    /// The cache keys of its steps (what `--cache-to` exports).
    pub steps: Vec<StepRecord>,
    /// What it read and did, for provenance.
    pub trace: BuildTrace,
    /// The name of its build record (see [`explain::keep_for_image`]).
    pub record: String,
}

/// Builds op graphs into one store. The builds of one solver (a build's platforms, side by
/// side) share its in-flight steps: an identical step waits for the one running, then hits.
pub struct Solver<'s> {
    store: &'s Store,
    worker: &'s dyn Worker,
    flight: schedule::InFlight,
}

impl<'s> Solver<'s> {
    /// A solver whose RUN steps run on this host.
    pub fn new(store: &'s Store) -> Solver<'s> {
        Solver::with_worker(store, &HostWorker)
    }

    /// A solver whose RUN steps go to `worker`.
    pub fn with_worker(store: &'s Store, worker: &'s dyn Worker) -> Solver<'s> {
        Solver {
            store,
            worker,
            flight: schedule::InFlight::default(),
        }
    }

    /// Build the graph's target; returns the committed image, the cache keys of its steps
    /// and its trace.
    pub fn build(&self, req: &BuildRequest) -> Result<Outcome, BuildError> {
        // Held for the whole build so `cache prune` never removes what this build writes.
        let _lease = crate::cache::gc::build_lease(self.store)?;
        let env = self.worker.enter(self.store, req)?;
        // The context is read without following a symlink that was not there when it was
        // walked (held from the worker's mount namespace, entered just above, so that what
        // is opened through it can be bound).
        let _confined = crate::oci::at::confine(&req.context).map_err(|e| {
            BuildError::Other(format!("build context {}: {}", req.context.display(), e))
        })?;
        let shared = cx::Shared::new(self.store, req, env, self.worker, &self.flight);
        let stages: Vec<(usize, Vec<usize>)> = req
            .graph
            .stages
            .iter()
            .map(|s| (s.index, s.deps.clone()))
            .collect();
        schedule::run_stages(&stages, req.jobs, |i| shared.run_stage(i))?;
        shared.finish(req.graph.target)
    }
}

/// Build the graph's target with the host's worker; returns the committed image, the cache
/// keys of its steps and its trace.
pub fn build_recorded(store: &Store, req: &BuildRequest) -> Result<Outcome, BuildError> {
    Solver::new(store).build(req)
}
