//! COPY and ADD: the sources they read (context files by content, a stage by its key, an
//! image by its digest, URLs by checksum or never cached), and their layer, staged as a tree
//! by `solver::staging` and streamed from the source files.

use super::{view_path, OpRunner};
use crate::context::{IgnoreMatcher, SourceRoot};
use crate::oci::image::LayerRef;
use crate::plan::{CopyOp, CopySource, Input, Op};
use crate::solver::cx::Ctx;
use crate::solver::inputs::StepInput;
use crate::solver::{staging, users, BuildError};
use crate::worker::snapshots::RootView;

impl OpRunner for CopyOp {
    fn cache_map(&self, cx: &mut Ctx, op: &Op) -> Result<Vec<StepInput>, BuildError> {
        let origin = &op.origin;
        let mut inputs = Vec::new();
        // A git source: the commit its ref names now keys the step.
        for url in self.git_sources() {
            let source = crate::git::GitSource::parse(url).map_err(|e| cx.fail(origin, e))?;
            let commit =
                crate::git::resolve(&source, &git_auth(cx)).map_err(|e| cx.fail(origin, e))?;
            if let Some(sum) = &self.checksum {
                if !commit.starts_with(&sum.to_lowercase()) || sum.len() < 7 {
                    return Err(cx.fail(
                        origin,
                        format!("{} is at commit {}, not --checksum={}", url, commit, sum),
                    ));
                }
            }
            if let Ok(mut t) = cx.trace.lock() {
                t.urls.insert(url.clone(), format!("sha1:{}", commit));
            }
            inputs.push(StepInput::Git {
                url: url.clone(),
                commit,
            });
        }
        if !inputs.is_empty() {
            return Ok(inputs);
        }
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
        if let Some(url) = self.git_sources().next() {
            // The commit's tree, checked out beside the step, copied as a directory.
            let origin = &op.origin;
            let source = crate::git::GitSource::parse(url).map_err(|e| cx.fail(origin, e))?;
            let commit = cx
                .inputs
                .iter()
                .find_map(|i| match i {
                    StepInput::Git { url: u, commit } if u == url => Some(commit.clone()),
                    _ => None,
                })
                .ok_or_else(|| cx.fail(origin, format!("internal: {} was not resolved", url)))?;
            let scratch = cx.store.scratch_dir("git-")?;
            let tree = scratch.path().join("tree");
            crate::git::checkout(&source, &commit, &tree, self.keep_git_dir, &git_auth(cx))
                .map_err(|e| cx.fail(origin, e))?;
            let as_copy = CopyOp {
                is_add: false,
                sources: vec![CopySource::Path(
                    source.subdir.clone().unwrap_or_else(|| ".".into()),
                )],
                checksum: None,
                unpack: None,
                ..self.clone()
            };
            let root = SourceRoot::image(tree);
            return as_copy.stage(cx, op, rootfs, &root, owner);
        }
        let root = match &self.from {
            from @ (Input::Context | Input::Local(_)) => cx.context_root_of(&op.origin, from)?,
            from => SourceRoot::image(cx.source_for(&op.origin, from)?),
        };
        self.stage(cx, op, rootfs, &root, owner)
    }
}

impl CopyOp {
    /// The ADD's git sources.
    fn git_sources(&self) -> impl Iterator<Item = &String> {
        self.sources.iter().filter_map(|s| match s {
            CopySource::Git(u) => Some(u),
            _ => None,
        })
    }

    /// Stage the sources from `root` and commit the layer.
    fn stage(
        &self,
        cx: &mut Ctx,
        op: &Op,
        rootfs: &std::path::Path,
        root: &SourceRoot,
        owner: Option<users::Owner>,
    ) -> Result<LayerRef, BuildError> {
        let plan = staging::CopyPlan {
            sources: self.sources.clone(),
            dest: self.dest.clone(),
            dest_is_dir: self.dest_is_dir,
            root,
            owner,
            chmod: self.chmod.as_ref(),
            parents: self.parents,
            excludes: self.excludes.clone(),
            is_add: self.is_add,
            unpack: self.unpack,
            checksum: self.checksum.clone(),
            rootfs,
            epoch: cx.req.epoch,
            // What the key's read statted applies to a context's files only.
            known: if root.is_context {
                cx.source_stats.as_ref()
            } else {
                None
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

/// How git reaches a remote for this build: the `GIT_AUTH_TOKEN` secret (as BuildKit) and
/// the default `--ssh` agent.
fn git_auth(cx: &Ctx) -> crate::git::GitAuth {
    crate::solver::mounts::git_auth(&cx.req.secrets, &cx.req.ssh)
}
