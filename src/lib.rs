//! builder: a daemonless, Dockerfile-compatible OCI image builder.
//!
//! The modules follow the pipeline: [`syntax`] (parse) -> [`plan`] (build graph) ->
//! execution, store and cache -> export. `syntax` never imports from the stateful modules.

pub mod attest;
pub mod cache;
pub mod cli;
pub mod context;
pub mod epoch;
pub mod export;
pub mod frontend;
pub mod oci;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod solver;
pub mod store;
pub mod syntax;
pub mod worker;
