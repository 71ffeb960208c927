//! One stage's run: its base, then each op in turn. A config op applies at once and enters
//! the key at the next layered op; a layered op is keyed (its runner's cache map on top of
//! the chain), asked of the cache (an identical step running elsewhere is waited for), run
//! when it misses, and recorded for the cache export and the provenance.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::cx::{Ctx, Shared, StageResult};
use super::explain::{self, RecordedStep};
use super::inputs::{self, StageKey};
use super::ops;
use super::schedule::Claim;
use super::{BuildError, Outcome, StepRecord};
use crate::attest::trace::StepTrace;
use crate::cache::CacheKey;
use crate::oci::image::ImageState;
use crate::plan::{Op, Source, StagePlan};
use crate::store::StoreError;
use crate::worker::snapshots::{chain_ids, RootView, ViewNeed};
use crate::worker::Snapshotter;

/// A layered step of a stage: the stage, its place in it, the op and its runner.
struct Step<'a> {
    stage: &'a StagePlan,
    at: usize,
    op: &'a Op,
    runner: &'a dyn ops::OpRunner,
    use_cache: bool,
    started: Instant,
}

impl Shared<'_> {
    /// Run stage `index` and keep its result for the stages that read it.
    pub fn run_stage(&self, index: usize) -> Result<(), BuildError> {
        let mut cx = Ctx {
            sh: self,
            step: 0,
            platform: self
                .req
                .graph
                .stage(index)
                .map(|s| s.platform.clone())
                .unwrap_or_else(|| self.req.platform.clone()),
            inputs: Vec::new(),
            volatile: false,
            source_stats: None,
            snapshot_ahead: None,
            base: Default::default(),
            layered_yet: false,
            listings: Vec::new(),
            layers_below: Vec::new(),
            label: String::new(),
        };
        let r = cx.run_stage(index);
        let r = cx.settle_listings().and(r);
        // What was hashed stays useful even when a step failed.
        self.hasher.save();
        let result = r?;
        self.results
            .lock()
            .map_err(|_| BuildError::Other("internal: a stage thread panicked".into()))?
            .insert(index, result);
        Ok(())
    }

    /// Commit the target stage as the build's image.
    pub fn finish(self, target: usize) -> Result<Outcome, BuildError> {
        let stage = self
            .results
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&target))
            .ok_or_else(|| BuildError::Other("the target stage produced no result".into()))?;
        let mut state = stage.state;
        state.config.set_created(Some(self.created.clone()));
        if self.req.squash {
            super::layers::squash(
                self.store,
                &mut state,
                (stage.base_layers, stage.base_history),
                self.req.compression,
                &self.created,
            )?;
        }
        if !self.req.labels.is_empty() {
            crate::plan::ConfigEdit::Labels {
                labels: self.req.labels.clone(),
            }
            .apply(&mut state);
        }
        if self.req.force_compression {
            state.layers = super::layers::force_compression(
                self.store,
                &state.layers,
                self.req.compression,
                self.req.reporter,
            )?;
        }
        let image = state
            .commit(&self.store.blobs, &BTreeMap::new())
            .map_err(StoreError::from)?;
        // A build that ran nothing leaves the last record as it is (it still holds).
        if self.ran.load(Ordering::Relaxed) || !explain::exists(self.store, self.req) {
            let previous = self.previous().cloned();
            let record = self.record.into_inner().unwrap_or_default();
            explain::save(self.store, self.req, record, previous.as_ref());
        }
        let steps = self.steps.into_inner().unwrap_or_default();
        let mut trace = self.trace.into_inner().unwrap_or_default();
        // Stages finish in any order: the record is in build-file order.
        trace.steps.sort_by_key(|s| (s.stage, s.step));
        trace.target_stage = target;
        Ok(Outcome {
            image,
            steps,
            trace,
            record: explain::record_key(self.req),
        })
    }
}

impl Ctx<'_, '_> {
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
        self.label = stage.label();
        let (mut state, mut key) = self.base(index, stage, &label)?;
        let (base_layers, base_history) = (state.layers.len(), state.config.history().len());
        let use_cache = !self.req.no_cache
            && !self
                .req
                .no_cache_filter
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&stage.label()) || *f == index.to_string());
        let mut view: Option<RootView> = None;
        let mut pending: Vec<String> = Vec::new();
        for (at, op) in stage.ops.iter().enumerate() {
            let started = self.start_step(&label, &op.origin.text);
            let Some(runner) = ops::runner_for(&op.action) else {
                // Config ops are cheap: apply now; they enter the key at the next layer
                // op or the stage's end.
                self.apply(op, &mut state, &mut view)?;
                pending.push(op.cache_key().to_string());
                self.req.reporter.done(self.step, started.elapsed(), false);
                continue;
            };
            key = inputs::key_config_ops(key, &mut pending);
            let step = Step {
                stage,
                at,
                op,
                runner,
                use_cache,
                started,
            };
            let hit;
            (key, hit) = self.layered_step(&step, key, &mut state, &mut view)?;
            self.req.reporter.done(self.step, started.elapsed(), hit);
        }
        let key = inputs::key_config_ops(key, &mut pending);
        self.req.reporter.stage_done(&label);
        Ok(StageResult {
            state,
            key,
            view,
            volatile: self.volatile,
            base_layers,
            base_history,
        })
    }

    /// The stage's FROM: its base's state with the base edits, and the first key (the base's,
    /// and everything that shapes layer bytes and timestamps).
    fn base(
        &mut self,
        index: usize,
        stage: &StagePlan,
        label: &str,
    ) -> Result<(ImageState, CacheKey), BuildError> {
        let started = self.start_step(label, &stage.origin.text);
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
            Source::Stage(i) => format!("stage:{}", self.stage_label(*i)),
            Source::Image { reference, .. } => reference.clone(),
        };
        if let Ok(mut t) = self.trace.lock() {
            t.stages.insert(index, (stage.label(), base_name.clone()));
        }
        // What the base is (compared with the last build's) and how a miss's reason names
        // its change.
        self.base = match &stage.source {
            Source::Image { reference, image } => (
                format!("{} {}", reference, image.manifest_digest),
                format!("base image {} now {}", reference, image.manifest_digest),
            ),
            Source::Stage(i) => {
                let name = self.stage_label(*i);
                (
                    format!("stage {} {}", name, base_key.0),
                    format!("stage {} changed", name),
                )
            }
            Source::Scratch => ("scratch".to_string(), String::new()),
        };
        if let Ok(mut r) = self.record.lock() {
            r.bases.insert(index, self.base.0.clone());
        }
        self.req.reporter.done(self.step, started.elapsed(), false);
        let key = inputs::stage_key(
            &base_key,
            &StageKey {
                ops: crate::plan::OP_KEY_VERSION,
                epoch: self.req.epoch,
                compression: self.req.compression.key(),
                platform: self.platform.spec(),
                base_edits: &stage.base_edits,
            },
        );
        Ok((state, key))
    }

    /// One layered step on top of `parent`: its key, then a cache hit (an identical step
    /// running elsewhere is waited for), or its run, recorded in the cache. Returns its key
    /// and whether it hit.
    fn layered_step(
        &mut self,
        step: &Step,
        parent: CacheKey,
        state: &mut ImageState,
        view: &mut Option<RootView>,
    ) -> Result<(CacheKey, bool), BuildError> {
        let (op, runner) = (step.op, step.runner);
        self.source_stats = None;
        self.inputs = runner.cache_map(self, op)?;
        let op_key = op.cache_key().to_string();
        let key = inputs::step_key(&parent, op_key.clone(), &self.inputs);
        let recorded = RecordedStep::new(
            (step.stage.index, step.at + 1),
            &op.origin.text,
            op_key,
            &parent.0.to_string(),
            &key.0.to_string(),
            &self.inputs,
        );
        let first = !std::mem::replace(&mut self.layered_yet, true);
        let layers_before = state.layers.len();
        let claim = if step.use_cache {
            let id = key.0.to_string();
            match self.flight.claim(&id, || self.cache.get(&key)) {
                Claim::Hit(hit) => {
                    self.keep_record(recorded);
                    *state = hit.state;
                    self.record_step(step.stage.index, &key);
                    self.trace_step(step, &key, state, layers_before, None);
                    return Ok((key, true));
                }
                Claim::Run(held) => Some(held),
            }
        } else {
            None
        };
        self.ran.store(true, Ordering::Relaxed);
        let mut miss = None;
        if let Some(previous) = self.previous() {
            let why = if !step.use_cache {
                if self.req.no_cache {
                    "--no-cache".to_string()
                } else {
                    "--no-cache-filter".to_string()
                }
            } else {
                let before = previous
                    .steps
                    .iter()
                    .find(|p| (p.stage, p.step) == (recorded.stage, recorded.step));
                let base_change = previous
                    .bases
                    .get(&step.stage.index)
                    .filter(|b| **b != self.base.0)
                    .map(|_| self.base.1.as_str());
                explain::reason(before, &recorded, base_change, first)
            };
            self.req.reporter.miss(self.step, &why);
            miss = Some(why);
        }
        self.keep_record(recorded);
        // What the stage's next layered step reads of this one's layer is unpacked from the
        // layer's own stream as it is written, instead of from the blob afterwards.
        self.snapshot_ahead = match (self.snapshotter, runner.snapshots_ahead()) {
            (Snapshotter::Overlay, true) => step.stage.ops[step.at + 1..]
                .iter()
                .find_map(|o| ops::runner_for(&o.action))
                .map(|next| (chain_ids(&state.layers).pop(), next.view_need())),
            _ => None,
        };
        let unpacked_before = self.snaps.unpacked();
        let outcome = self
            .sync_view(view, state, runner.view_need())
            .and_then(|_| {
                self.report_unpacked(unpacked_before);
                self.apply(op, state, view)
            });
        self.snapshot_ahead = None;
        if outcome.is_ok() {
            match self.cache.put(&key, state) {
                Ok(()) => self.record_step(step.stage.index, &key),
                Err(e) => self
                    .req
                    .reporter
                    .warn(&format!("could not record the cache entry: {}", e)),
            }
        }
        // Whoever waits for this key looks again now (and runs it if this failed).
        drop(claim);
        outcome?;
        self.trace_step(step, &key, state, layers_before, Some(miss));
        Ok((key, false))
    }

    /// The step's provenance record: where it is, its key, what it read, its layer. `ran` is
    /// `None` for a hit, else why it missed (when there was an earlier build to compare).
    fn trace_step(
        &mut self,
        step: &Step,
        key: &CacheKey,
        state: &ImageState,
        layers_before: usize,
        ran: Option<Option<String>>,
    ) {
        let layer = (state.layers.len() > layers_before)
            .then(|| state.layers.last())
            .flatten()
            .map(|l| (l.digest.to_string(), l.diff_id.to_string()));
        let record = StepTrace {
            stage: step.stage.index,
            stage_name: step.stage.label(),
            step: step.at + 1,
            line: step.op.origin.line,
            op: step.op.origin.text.clone(),
            key: if self.volatile {
                String::new()
            } else {
                key.0.to_string()
            },
            inputs: inputs::records(&std::mem::take(&mut self.inputs)),
            layer,
            cached: ran.is_none(),
            seconds: step.started.elapsed().as_secs_f64(),
            miss: ran.flatten(),
        };
        if let Ok(mut t) = self.trace.lock() {
            t.steps.push(record);
        }
    }

    fn keep_record(&self, step: RecordedStep) {
        if let Ok(mut r) = self.record.lock() {
            r.steps.push(step);
        }
    }

    /// Number the next step of the build and show it starting.
    fn start_step(&mut self, label: &str, text: &str) -> Instant {
        self.step = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.req
            .reporter
            .step(self.step, self.total.load(Ordering::Relaxed), label, text);
        Instant::now()
    }

    fn record_step(&self, stage: usize, key: &CacheKey) {
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(StepRecord {
                stage,
                key: key.clone(),
            });
        }
    }

    /// Say how many layers were unpacked (and their blobs' bytes) since `before`, while
    /// the step waited for its view.
    fn report_unpacked(&self, before: (u64, u64)) {
        let (layers, bytes) = self.snaps.unpacked();
        if layers > before.0 {
            self.req.reporter.detail(
                self.step,
                &format!(
                    "unpacked {} layers before the step, {} bytes of blobs",
                    layers - before.0,
                    bytes - before.1
                ),
            );
        }
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

    /// entry.
    fn apply(
        &mut self,
        op: &Op,
        state: &mut ImageState,
        view: &mut Option<RootView>,
    ) -> Result<(), BuildError> {
        for e in &op.edits {
            e.apply(state);
        }
        self.layers_below.clone_from(&state.layers);
        let layer = match ops::runner_for(&op.action) {
            None => None,
            Some(runner) => Some(runner.run(self, op, view)?),
        };
        if let Some(created_by) = &op.history {
            state.push_history(&self.created, created_by, layer);
        }
        Ok(())
    }
}
