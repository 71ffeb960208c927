//! What a command tells the user when it fails: a message, the causes under it, and a hint
//! when a module's error carries one. The command line and the build pipeline return it.

use std::path::Path;

/// A failure to report to the user: a message and optional causes and hint.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub causes: Vec<String>,
    pub hint: Option<String>,
    pub exit_code: i32,
    /// A failed RUN's kept state, for `--on-error=shell`.
    pub failed_step: Option<String>,
}

impl CliError {
    pub fn msg(m: impl Into<String>) -> Self {
        CliError {
            message: m.into(),
            causes: Vec::new(),
            hint: None,
            exit_code: 1,
            failed_step: None,
        }
    }
    /// What the user is told, a line each: the message, its causes, the hint.
    pub fn report(&self) -> String {
        let mut out = String::new();
        if !self.message.is_empty() {
            out.push_str(&format!("error: {}\n", self.message));
        }
        for c in &self.causes {
            out.push_str(&format!("  Caused by: {}\n", c));
        }
        if let Some(h) = &self.hint {
            out.push_str(&format!("  hint: {}\n", h));
        }
        out
    }
    /// An exit with `code` and nothing to say (what was to say is said).
    pub fn exit(code: i32) -> Self {
        CliError {
            exit_code: code,
            ..CliError::msg("")
        }
    }
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        CliError::msg(format!("{}: {}", path.display(), e))
    }
    pub fn with_hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
}

impl<E: std::error::Error + 'static> From<E> for CliError {
    fn from(e: E) -> Self {
        let mut causes = Vec::new();
        let mut hint = None;
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cur {
            if !std::ptr::addr_eq(err, &e as &dyn std::error::Error) {
                causes.push(err.to_string());
            }
            hint = hint.or_else(|| hint_of(err));
            cur = err.source();
        }
        CliError {
            message: e.to_string(),
            causes,
            hint,
            exit_code: 1,
            failed_step: None,
        }
    }
}

/// A build failure for the user: a failed step's message, then its build-file line with a
/// caret under the column (the solver names the origin; only the command line has the text).
pub fn build_failure(e: crate::solver::BuildError, source: &str) -> CliError {
    let caret = match &e {
        crate::solver::BuildError::Step(f) => {
            let line = source.lines().nth(f.line.saturating_sub(1)).unwrap_or("");
            crate::text::caret_under(line.trim_end(), f.column)
        }
        _ => String::new(),
    };
    let failed_step = e.failed_state().map(str::to_string);
    let mut failure = CliError::from(e);
    failure.message.push_str(&caret);
    failure.failed_step = failed_step;
    failure
}

/// The hint a module's error carries, if any.
fn hint_of(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(e) = e.downcast_ref::<crate::registry::RegistryError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<crate::store::StoreError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<crate::solver::BuildError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<crate::frontend::LowerError>() {
        return e.cause().and_then(hint_of);
    }
    None
}
