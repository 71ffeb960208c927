//! builder: a daemonless, Dockerfile-compatible OCI image builder.
//!
//! The modules follow the pipeline: [`syntax`] (parse) -> [`frontend`] (stages, then typed
//! ops) -> [`plan`] (the op graph, plain data) -> [`solver`] (schedule, cache, run through
//! the [`worker`]) -> [`store`] and [`export`]. [`pipeline`] runs that sequence for one
//! `builder build`, and [`cli`] only turns flags into its options. `syntax`, `plan` and
//! `oci` are pure; the solver imports neither `syntax` nor `frontend`.

pub mod attest;
pub mod cache;
pub mod cli;
pub mod context;
pub mod epoch;
pub mod export;
pub mod failure;
pub mod frontend;
pub mod git;
pub mod oci;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod solver;
pub mod store;
pub mod syntax;
pub mod text;
pub mod worker;
