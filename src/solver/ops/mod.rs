//! One runner per op kind that makes a layer. A runner says what its op reads besides
//! itself (its cache map: the typed inputs of its key and its provenance record), what it
//! needs of the stage's filesystem, and how it runs. The stage loop knows no op kind: a new
//! kind is a plan type, its lowering, a file here, and one line in [`runner_for`].

mod copy;
mod exec;
mod mkdir;

use super::cx::Ctx;
use super::inputs::StepInput;
use super::BuildError;
use crate::oci::image::LayerRef;
use crate::plan::{Action, Op};
use crate::worker::snapshots::{RootView, ViewNeed};

/// How the solver runs one kind of op.
pub(super) trait OpRunner {
    /// What the op reads besides its own fields, as it stands now (context files, stages and
    /// images it copies or mounts from), for its key and its provenance record. Checks what
    /// must hold even when the step hits (entitlements).
    fn cache_map(&self, cx: &mut Ctx, op: &Op) -> Result<Vec<StepInput>, BuildError>;

    /// What it reads of the stage's filesystem: RUN reads file contents; COPY and WORKDIR
    /// only look up paths.
    fn view_need(&self) -> ViewNeed {
        ViewNeed::Metadata
    }

    /// Whether its layer is written from a tree, so that the next step's snapshot can be
    /// unpacked from the layer's stream as it is written.
    fn snapshots_ahead(&self) -> bool {
        false
    }

    /// Run it on the stage's view (none yet before a first op on scratch); returns its layer.
    fn run(
        &self,
        cx: &mut Ctx,
        op: &Op,
        view: &mut Option<RootView>,
    ) -> Result<LayerRef, BuildError>;
}

/// The runner of an op that makes a layer; `None` for a config-only op.
pub(super) fn runner_for(action: &Action) -> Option<&dyn OpRunner> {
    match action {
        Action::Config => None,
        Action::Mkdir(m) => Some(m),
        Action::Copy(c) => Some(c),
        Action::Exec(e) => Some(e),
    }
}

/// The path of a stage's view (empty before one exists: a first op on scratch sees nothing).
fn view_path(view: &Option<RootView>) -> std::path::PathBuf {
    view.as_ref()
        .map(|v| v.path().to_path_buf())
        .unwrap_or_default()
}
