//! The command line: clap structures, their validation into options, and the commands.

pub mod debug;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

pub use crate::failure::{build_failure, CliError};

#[derive(Debug, Parser)]
#[command(
    name = "builder",
    version,
    about = "A daemonless, Dockerfile-compatible OCI image builder"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image from a build file.
    Build(Box<build::BuildArgs>),
    /// Turn a root filesystem (directory or tar) into a one-layer image.
    Import(images::ImportArgs),
    /// List images in the store.
    Images(images::RootArg),
    /// Print an image's manifest and config.
    Inspect {
        reference: String,
        #[command(flatten)]
        root: images::RootArg,
    },
    /// Print an image's history.
    History {
        reference: String,
        #[command(flatten)]
        root: images::RootArg,
    },
    /// Give an image another name.
    Tag {
        source: String,
        target: String,
        #[command(flatten)]
        root: images::RootArg,
    },
    /// Remove image names.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        root: images::RootArg,
    },
    /// Export an image (oci:DIR, oci-archive:FILE, docker-archive:FILE, local:DIR).
    Export {
        reference: String,
        #[arg(short = 'o', long = "output", required = true)]
        outputs: Vec<String>,
        #[command(flatten)]
        root: images::RootArg,
    },
    /// Manage the layer cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Show what differs between two images, and why when both carry provenance (exit 0
    /// when identical, 1 when not). Each is a store name, oci:DIR[:TAG],
    /// oci-archive:FILE[:TAG], docker-archive:FILE or a registry reference.
    Diff {
        a: String,
        b: String,
        /// text or json
        #[arg(long, default_value = "text")]
        format: String,
        /// Which image of an index to compare (default: this machine's platform).
        #[arg(long)]
        platform: Option<String>,
        #[command(flatten)]
        root: images::RootArg,
    },
    /// Rebuild a published image from its provenance in a fresh store, and say whether it
    /// reproduced (exit 0) or why not (exit 1).
    Verify(verify::VerifyArgs),
    /// Re-hash the store and report any problem.
    Fsck(images::RootArg),
    /// Pull an image from a registry into the store.
    Pull(registry::PullArgs),
    /// Push a stored image to a registry: `builder push NAME [REGISTRY/REPO:TAG]`.
    Push(registry::PushArgs),
    /// Save credentials for a registry (verified first).
    Login(registry::LoginArgs),
    /// Forget a registry's credentials.
    Logout(registry::LogoutArgs),
    /// Join per-platform images into one index at a registry, and show indexes.
    #[command(subcommand)]
    Imagetools(imagetools::ImagetoolsCommand),
    /// Front-end debugging commands.
    #[command(subcommand)]
    Debug(debug::DebugCommand),
}

pub mod build;
mod debug_build;
pub mod flags;
pub mod images;
mod imagetools;
pub mod registry;
mod session;
mod verify;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Show how much space the store uses.
    Du(images::RootArg),
    /// Remove cache entries and what only they need (never what a tagged image needs).
    Prune {
        /// Remove every cache entry (default: only entries whose layers no tagged image uses).
        #[arg(long)]
        all: bool,
        /// Remove the oldest entries until the cache holds at most SIZE (e.g. 10GB).
        #[arg(long, value_name = "SIZE")]
        keep_storage: Option<String>,
        /// `until=DURATION`: remove entries older than DURATION (e.g. 24h).
        #[arg(long, value_name = "until=DURATION")]
        filter: Option<String>,
        #[command(flatten)]
        root: images::RootArg,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Build(a) => build::run(*a),
        Command::Import(a) => images::import(a),
        Command::Images(r) => images::list(&r),
        Command::Inspect { reference, root } => images::inspect(&root, &reference),
        Command::History { reference, root } => images::history(&root, &reference),
        Command::Tag {
            source,
            target,
            root,
        } => images::tag(&root, &source, &target),
        Command::Rm { names, root } => images::rm(&root, &names),
        Command::Export {
            reference,
            outputs,
            root,
        } => images::export_image(&root, &reference, &outputs),
        Command::Fsck(r) => images::fsck(&r),
        Command::Pull(a) => registry::pull(a),
        Command::Push(a) => registry::push(a),
        Command::Login(a) => registry::login(a),
        Command::Logout(a) => registry::logout(a),
        Command::Diff {
            a,
            b,
            format,
            platform,
            root,
        } => images::diff(&root, &a, &b, &format, platform.as_deref()),
        Command::Cache(CacheCommand::Du(r)) => images::cache_du(&r),
        Command::Cache(CacheCommand::Prune {
            all,
            keep_storage,
            filter,
            root,
        }) => {
            // A rootless build's snapshots hold files its subordinate ids own, which only
            // the same user namespace may delete.
            if !nix::unistd::geteuid().is_root() {
                let _ = crate::worker::enter_user_namespace();
            }
            images::cache_prune(&root, all, keep_storage.as_deref(), filter.as_deref())
        }
        Command::Imagetools(c) => imagetools::run(c),
        Command::Verify(a) => verify::run(a),
        Command::Debug(d) => debug::run(d),
    }
}

/// Read a build file; the returned name is how errors refer to it.
pub fn read_build_file(path: &Path) -> Result<(String, String), CliError> {
    let bytes = std::fs::read(path).map_err(|e| CliError::io(path, e))?;
    let name = path.display().to_string();
    match String::from_utf8(bytes) {
        Ok(text) => Ok((name, text)),
        // As BuildKit, a build file must be UTF-8: say where it is not, never guess.
        Err(e) => {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            let before = &bytes[..at];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            Err(CliError::msg(format!(
                "{}:{}:{}: invalid UTF-8 (byte 0x{:02x}): build files must be UTF-8",
                name, line, column, bytes[at]
            )))
        }
    }
}

/// `K=V` and bare `K` (value from the environment, skipped when unset), as `--build-arg` takes.
/// A value from the environment that is not UTF-8 is an error, never silently empty.
pub fn parse_key_values(items: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut m = BTreeMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) => {
                m.insert(k.to_string(), v.to_string());
            }
            None => match std::env::var(item) {
                Ok(v) => {
                    m.insert(item.clone(), v);
                }
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(CliError::msg(format!(
                        "--build-arg {}: the environment variable {} is not valid UTF-8",
                        item, item
                    )))
                }
            },
        }
    }
    Ok(m)
}

/// The build file for a context: `-f` if given, else Buildfile, Dockerfile, Containerfile.
pub fn find_build_file(context: &Path, file: Option<&PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(f) = file {
        return Ok(f.clone());
    }
    for name in ["Buildfile", "Dockerfile", "Containerfile"] {
        let p = context.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(CliError::msg(format!(
        "no Buildfile, Dockerfile or Containerfile in {}",
        context.display()
    ))
    .with_hint("name one with -f FILE"))
}
