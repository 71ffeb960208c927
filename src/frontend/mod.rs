//! The frontend: everything read from a build file before anything runs.
//!
//! - [`graph`] splits the parsed file into stages, resolves the ARGs FROM lines use, names
//!   the stages, prunes what the target does not need and orders the rest.
//! - [`lower`] turns each stage's instructions into typed, fully resolved ops
//!   ([`crate::plan`]), with ARG and ENV scoping, ONBUILD triggers, config folded into a
//!   typed image state, and history texts as BuildKit writes them.
//! - [`checks`] runs BuildKit's build checks on the parsed file.
//!
//! The solver never imports this module: it runs the [`crate::plan::OpGraph`] made here.

pub mod checks;
pub mod graph;
mod history;
pub mod lower;
pub mod outline;
pub mod scope;

pub use graph::{lower as lower_graph, Base, BuildGraph, PlanError, PlanOptions, Stage};
pub use lower::{lower as lower_ops, BaseResolver, LowerError, LowerOptions};
pub use scope::{Scope, PROXY_ARGS};
