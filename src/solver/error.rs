//! How a build fails: a step's failure carries the op's origin (file, line, column, the
//! instruction as written), and the command line draws the build file's line under it.

use crate::plan::Origin;
use crate::store::StoreError;

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

    /// A failure of the op from `origin` in `file`, at step `step` (`N/total`).
    pub fn at(file: &str, origin: &Origin, step: String, msg: impl Into<String>) -> BuildError {
        BuildError::Step(Box::new(StepFailure {
            file: file.to_string(),
            line: origin.line,
            column: origin.column,
            step,
            text: origin.text.clone(),
            msg: msg.into(),
            hint: None,
            failed_state: None,
        }))
    }

    /// A failed step whose state is kept as `id` in the store at `root`: the hint says how
    /// to look inside.
    pub fn with_failed_state(self, id: String, root: &std::path::Path) -> BuildError {
        match self {
            BuildError::Step(mut f) => {
                let default = crate::store::default_root();
                let same = default.canonicalize().is_ok_and(|d| d == root);
                let root_arg = if same {
                    String::new()
                } else {
                    format!(" --root {}", root.display())
                };
                f.hint = Some(format!(
                    "to look inside the failed step: builder debug shell{} {}",
                    root_arg, id
                ));
                f.failed_state = Some(id);
                BuildError::Step(f)
            }
            other => other,
        }
    }

    /// The id of the failed step's kept state, if it was kept.
    pub fn failed_state(&self) -> Option<&str> {
        match self {
            BuildError::Step(f) => f.failed_state.as_deref(),
            _ => None,
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
    /// What the user can do about it, when something can be said.
    pub hint: Option<String>,
    /// A failed RUN's kept state (`builder debug shell ID`).
    pub failed_state: Option<String>,
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: step {} {}: {}",
            self.file,
            self.line,
            self.column,
            self.step,
            crate::text::abbreviate(&self.text, 120),
            crate::text::abbreviate(&self.msg, 4000),
        )
    }
}
