//! COPY and ADD: the sources they read (context files by content, a stage by its key, an
//! image by its digest, URLs by checksum or never cached), and their layer, staged as a tree
//! by `solver::staging` and streamed from the source files.

use super::{view_path, OpRunner};
use crate::context::{IgnoreMatcher, SourceRoot};
use crate::oci::image::LayerRef;
use crate::plan::{CopyOp, Input, Op};
use crate::solver::cx::Ctx;
use crate::solver::inputs::StepInput;
use crate::solver::{staging, users, BuildError};
use crate::worker::snapshots::RootView;

impl OpRunner for CopyOp {
    fn cache_map(&self, cx: &mut Ctx, op: &Op) -> Result<Vec<StepInput>, BuildError> {
        let origin = &op.origin;
        let mut inputs = Vec::new();
        match &self.from {
            from @ (Input::Context | Input::Local(_)) => {
                let excludes = IgnoreMatcher::new(&self.excludes)
                    .map_err(|e| cx.fail(origin, format!("--exclude: {}", e)))?;
                inputs.push(cx.context_input(origin, from, &self.paths(), &excludes, None)?);
            }
            // The sources are paths in that stage or image: its identity covers them.
            from => inputs.push(cx.input_of(origin, from, ".", None)?),
        }
        if let Some(sum) = &self.checksum {
            for u in self.urls() {
                inputs.push(cx.trace_url(u, sum));
            }
        } else if self.fetches_unpinned() {
            // Remote content is unknown until fetched: never reuse such a step.
            cx.volatile = true;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            inputs.push(StepInput::Uncacheable(now.to_string()));
        }
        Ok(inputs)
    }

    fn snapshots_ahead(&self) -> bool {
        true
    }

    fn run(
        &self,
        cx: &mut Ctx,
        op: &Op,
        view: &mut Option<RootView>,
    ) -> Result<LayerRef, BuildError> {
        let rootfs = view_path(view);
        let rootfs = rootfs.as_path();
        let owner = match &self.chown {
            Some(chown) => {
                Some(users::resolve_chown(rootfs, chown).map_err(|e| cx.fail(&op.origin, e))?)
            }
            None => None,
        };
        let root = match &self.from {
            from @ (Input::Context | Input::Local(_)) => cx.context_root_of(&op.origin, from)?,
            from => SourceRoot {
                root: cx.source_for(&op.origin, from)?,
                ignore: IgnoreMatcher::default(),
                is_context: false,
            },
        };
        let plan = staging::CopyPlan {
            sources: self.sources.clone(),
            dest: self.dest.clone(),
            dest_is_dir: self.dest_is_dir,
            root: &root,
            owner,
            chmod: self.chmod.as_ref(),
            parents: self.parents,
            excludes: self.excludes.clone(),
            is_add: self.is_add,
            unpack: self.unpack,
            checksum: self.checksum.clone(),
            rootfs,
            epoch: cx.req.epoch,
            known: match self.from {
                Input::Context | Input::Local(_) => cx.source_stats.as_ref(),
                _ => None,
            },
        };
        let staged = staging::stage(&plan).map_err(|e| cx.fail(&op.origin, e.to_string()))?;
        if self.checksum.is_none() {
            for (url, digest) in &staged.fetched {
                let input = cx.trace_url(url, digest);
                cx.inputs.push(input);
            }
        }
        for s in &staged.skipped {
            cx.req.reporter.warn(&format!(
                "{}:{}: {}: skipped {}: only files, directories and symlinks are copied",
                cx.req.file_name, op.origin.line, op.origin.text, s
            ));
        }
        cx.commit_tree(op, &staged.tree)
    }
}
