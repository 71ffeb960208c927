//! WORKDIR's layer: empty when the directory exists, else the directory and its missing
//! parents, owned by the op's user.

use std::path::Path;

use super::{view_path, OpRunner};
use crate::context::SourceRoot;
use crate::oci::image::LayerRef;
use crate::oci::unpack;
use crate::plan::{MkdirOp, Op};
use crate::solver::cx::Ctx;
use crate::solver::inputs::StepInput;
use crate::solver::{staging, users, BuildError};
use crate::worker::snapshots::RootView;

impl OpRunner for MkdirOp {
    fn cache_map(&self, _cx: &mut Ctx, _op: &Op) -> Result<Vec<StepInput>, BuildError> {
        // Whether the directory exists is a function of the parent's key.
        Ok(Vec::new())
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
        let exists = unpack::resolve_in_root(rootfs, Path::new(self.dir.trim_start_matches('/')))
            .map(|p| p.is_dir())
            .unwrap_or(false);
        if exists {
            return cx.commit_tree(op, &crate::oci::tree::LayerTree::default());
        }
        let owner = match &self.owner {
            Some(u) => Some(users::resolve_user(rootfs, u).map_err(|e| cx.fail(&op.origin, e))?),
            None => None,
        };
        let staged = staging::stage(&staging::CopyPlan {
            sources: Vec::new(),
            dest: self.dir.clone(),
            dest_is_dir: true,
            root: &SourceRoot::image(rootfs.to_path_buf()),
            owner,
            chmod: None,
            parents: false,
            excludes: Vec::new(),
            is_add: false,
            unpack: None,
            checksum: None,
            rootfs,
            epoch: cx.req.epoch,
            known: None,
        })
        .map_err(|e| cx.fail(&op.origin, e.to_string()))?;
        cx.commit_tree(op, &staged.tree)
    }
}
