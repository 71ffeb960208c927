//! `builder build`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::plan::{self, PlanOptions, Platform};

use super::{find_build_file, parse_key_values, read_build_file, CliError};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Tty,
    Plain,
    Json,
    Quiet,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build file (default: CONTEXT/Buildfile, else Dockerfile, else Containerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Name the result in the local store (repeatable).
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// Set a build-time variable (repeatable); K alone takes its value from the environment.
    #[arg(long = "build-arg", value_name = "K[=V]")]
    pub build_args: Vec<String>,
    /// Build this stage instead of the last one.
    #[arg(long)]
    pub target: Option<String>,
    /// Do not use the layer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Outputs: oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, local:DIR, or type=...
    #[arg(short = 'o', long = "output")]
    pub outputs: Vec<String>,
    /// The store (default $BUILDER_ROOT, else $XDG_DATA_HOME/builder, else ~/.local/share/builder).
    #[arg(long)]
    pub root: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Write the image (manifest) digest to this file.
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Write build metadata (digests, tags, layers) as JSON to this file.
    #[arg(long)]
    pub metadata_file: Option<PathBuf>,
    /// Target platform (os/arch[/variant]).
    #[arg(long)]
    pub platform: Option<String>,
    /// The build context.
    #[arg(default_value = ".")]
    pub context: PathBuf,
}

pub fn run(a: BuildArgs) -> Result<(), CliError> {
    let file = find_build_file(&a.context, a.file.as_ref())?;
    let (name, text) = read_build_file(&file)?;
    let (doc, typed) = crate::syntax::parse_instructions(&name, &text)?;
    let target_platform = match &a.platform {
        Some(p) => Platform::parse(p).ok_or_else(|| {
            CliError::msg(format!(
                "invalid --platform {:?}: want os/arch[/variant]",
                p
            ))
        })?,
        None => Platform::host(),
    };
    let opts = PlanOptions {
        target: a.target.clone(),
        build_args: parse_key_values(&a.build_args),
        target_platform,
        build_platform: Platform::host(),
    };
    let graph = plan::lower(&name, &text, doc.escape, &typed, &opts)?;
    for w in &graph.unused_build_args {
        eprintln!("warning: build-arg {} was not consumed by any ARG", w);
    }
    Err(CliError::msg(
        "building images is not implemented yet (the build file and its stage graph are valid)",
    ))
}
