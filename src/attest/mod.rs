//! Attestations: what an image was made of, recorded so that anyone can check it and so that
//! two builds can be told apart by cause. [`trace`] is what the solver records while it runs;
//! [`provenance`] turns it into an SLSA v1 in-toto statement; [`sbom`] scans an image's
//! layers for packages into an SPDX 2.3 document; [`explain`] compares two provenance
//! statements and names the inputs behind each differing layer. Every document is a
//! function of the build's inputs and epoch alone: no clock, host, path or random id.

pub mod explain;
pub mod provenance;
pub mod sbom;
pub mod signing;
pub mod trace;
