//! builder: a daemonless, Dockerfile-compatible OCI image builder.
//!
//! The modules follow the pipeline: [`syntax`] (parse) -> [`plan`] (build graph) ->
//! execution, store and cache -> export. `syntax` never imports from the stateful modules.

pub mod cli;
pub mod oci;
pub mod plan;
pub mod syntax;
