//! `builder debug ...`: the front end exposed for external conformance checks.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::frontend::{self, LowerOptions, PlanOptions};
use crate::oci::platform::Platform;
use crate::syntax::dockerignore::IgnoreMatcher;
use crate::syntax::expand::{LexOptions, Lexer};

use super::{parse_key_values, read_build_file, CliError};

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Parse a build file and print its AST.
    Parse(ParseArgs),
    /// Expand a word as a build file would.
    Expand(ExpandArgs),
    /// Check a path against a .dockerignore file: prints `match` or `nomatch`.
    IgnoreMatch { ignore_file: PathBuf, path: String },
    /// Print the pruned stage graph of a build file.
    Graph(GraphArgs),
    /// Print the op graph a build file lowers to, each op with its cache key (as
    /// `buildctl debug dump-llb` does). Base images come from the store, pulled if missing.
    Ops(OpsArgs),
    /// Print the OCI runtime spec a RUN step gets (the sandbox policy), as both executors
    /// run it.
    Sandbox(SandboxArgs),
    /// List every step of the build that made an image: its key, whether the cache had
    /// it, and why it missed.
    Cache(super::debug_build::CacheArgs),
    /// Open a shell (or run `-- CMD`) in a failed RUN step's state, or with --target in a
    /// stage's final state, under the step's own sandbox.
    Shell(super::debug_build::ShellArgs),
    /// Write a failed RUN step's files (with what it wrote) to a directory.
    Export(super::debug_build::ExportArgs),
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// The step's network: default, none or host.
    #[arg(long, default_value = "default")]
    network: String,
    /// As `RUN --security=insecure` (with `--allow security.insecure`).
    #[arg(long)]
    insecure: bool,
    /// The step's user as UID[:GID].
    #[arg(long, default_value = "0:0")]
    user: String,
    /// The command (default: /bin/sh -c true).
    command: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ParseFormat {
    /// BuildKit's low-level `result` dump.
    BuildkitResult,
    /// Typed instructions with spans.
    Json,
}

#[derive(Debug, Args)]
pub struct ParseArgs {
    #[arg(long, value_enum, default_value = "json")]
    format: ParseFormat,
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExpandArgs {
    /// Process the input as one word.
    #[arg(long, conflicts_with = "words", required_unless_present = "words")]
    word: bool,
    /// Process the input into words.
    #[arg(long)]
    words: bool,
    /// Set a variable (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// The text to expand.
    input: String,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[arg(long)]
    target: Option<String>,
    #[arg(long = "build-arg", value_name = "K[=V]")]
    build_args: Vec<String>,
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct OpsArgs {
    #[arg(long)]
    target: Option<String>,
    #[arg(long = "build-arg", value_name = "K[=V]")]
    build_args: Vec<String>,
    /// The target platform (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// The default network of RUN steps: default, none or host.
    #[arg(long, default_value = "default")]
    network: String,
    /// Print the ops as JSON instead of the listing.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    root: super::images::RootArg,
    file: PathBuf,
}

fn print_ops(a: OpsArgs) -> Result<(), CliError> {
    let (name, text) = read_build_file(&a.file)?;
    let (doc, typed) = crate::syntax::parse_instructions(&name, &text)?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p)
            .ok_or_else(|| CliError::msg(format!("invalid --platform {:?}", p)))?,
        None => Platform::host(),
    };
    let opts = PlanOptions {
        target: a.target.clone(),
        build_args: parse_key_values(&a.build_args)?,
        target_platform: platform.clone(),
        build_platform: Platform::host(),
        contexts: Default::default(),
    };
    let graph = frontend::lower_graph(&name, &text, doc.escape, &typed, &opts)?;
    let network = match a.network.as_str() {
        "default" => crate::plan::Network::Sandbox,
        "none" => crate::plan::Network::None,
        "host" => crate::plan::Network::Host,
        other => {
            return Err(CliError::msg(format!(
                "invalid --network {:?}: default, none or host",
                other
            )))
        }
    };
    let store = a.root.open()?;
    let registry = crate::registry::Client::from_config()?;
    let reporter = crate::progress::QuietReporter;
    let resolver = crate::pipeline::StoreResolver {
        store: &store,
        client: &registry,
        policy: crate::registry::PullPolicy::Missing,
        reporter: &reporter,
    };
    let ops = frontend::lower_ops(
        &graph,
        &LowerOptions {
            file: &name,
            source: &text,
            escape: doc.escape,
            build_args: &opts.build_args,
            platform,
            network,
            extra_hosts: Vec::new(),
            limits: Default::default(),
            made: Default::default(),
        },
        &resolver,
    )?;
    if a.json {
        let stages: Vec<serde_json::Value> = ops
            .stages
            .iter()
            .map(|s| {
                serde_json::json!({
                    "index": s.index,
                    "name": s.name,
                    "platform": s.platform.spec(),
                    "source": s.source.identity(&s.platform),
                    "base_edits": s.base_edits,
                    "ops": s.ops.iter().map(|op| serde_json::json!({
                        "line": op.origin.line,
                        "column": op.origin.column,
                        "text": op.origin.text,
                        "key": op.cache_key().to_string(),
                        "op": op,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = serde_json::json!({"target": ops.target, "stages": stages});
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| CliError::msg(e.to_string()))?
        );
    } else {
        print!("{}", ops.listing());
    }
    Ok(())
}

fn print_sandbox(a: SandboxArgs) -> Result<(), CliError> {
    use crate::worker::sandbox::{policy, Executor, NetworkMode, RootMount, RunSpec};
    let network = match a.network.as_str() {
        "default" => NetworkMode::Private,
        "none" => NetworkMode::Loopback,
        "host" => NetworkMode::Host,
        other => {
            return Err(CliError::msg(format!(
                "invalid --network {:?}: default, none or host",
                other
            )))
        }
    };
    let (uid, gid) = match a.user.split_once(':') {
        Some((u, g)) => (u.parse(), g.parse()),
        None => (a.user.parse(), Ok(0)),
    };
    let (Ok(uid), Ok(gid)) = (uid, gid) else {
        return Err(CliError::msg(format!(
            "invalid --user {:?}: want UID[:GID]",
            a.user
        )));
    };
    let argv = if a.command.is_empty() {
        vec!["/bin/sh".into(), "-c".into(), "true".into()]
    } else {
        a.command
    };
    let rootfs = PathBuf::from("/rootfs");
    let step = RunSpec {
        terminal: None,
        limits: Default::default(),
        root: RootMount::Bind {
            dir: rootfs.clone(),
        },
        argv,
        env: vec![("PATH".into(), crate::solver::mounts::DEFAULT_PATH.into())],
        cwd: "/".into(),
        uid,
        gid,
        groups: vec![gid],
        hostname: "builder".into(),
        network,
        process_sandbox: true,
        insecure: a.insecure,
        etc_files: vec![(
            PathBuf::from("/run/builder/resolv.conf"),
            "/etc/resolv.conf".into(),
        )],
        mounts: Vec::new(),
        executor: Executor::Builtin,
    };
    let netns = (network == NetworkMode::Private).then(|| PathBuf::from("/proc/PID/ns/net"));
    let spec = policy::runtime_spec(&step, &rootfs, netns.as_deref());
    println!(
        "{}",
        policy::to_json(&spec).map_err(|e| CliError::msg(e.to_string()))?
    );
    Ok(())
}

pub fn run(cmd: DebugCommand) -> Result<(), CliError> {
    match cmd {
        DebugCommand::Sandbox(a) => print_sandbox(a)?,
        DebugCommand::Cache(a) => super::debug_build::cache(a)?,
        DebugCommand::Shell(a) => super::debug_build::shell(a)?,
        DebugCommand::Export(a) => super::debug_build::export(a)?,
        DebugCommand::Parse(a) => {
            let (name, text) = read_build_file(&a.file)?;
            match a.format {
                ParseFormat::BuildkitResult => {
                    let doc = crate::syntax::parse(&name, &text)?;
                    print!("{}", doc.dump());
                }
                ParseFormat::Json => {
                    let (doc, typed) = crate::syntax::parse_instructions(&name, &text)?;
                    let v =
                        serde_json::json!({ "directives": doc.directives, "instructions": typed });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v)
                            .map_err(|e| CliError::msg(e.to_string()))?
                    );
                }
            }
        }
        DebugCommand::Expand(a) => {
            let env: Vec<(String, String)> = a
                .env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv.clone(), String::new()),
                })
                .collect();
            let lookup = |n: &str| {
                env.iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            let lexer = Lexer::new('\\', LexOptions::default());
            let out = if a.words {
                serde_json::to_string(
                    &lexer
                        .words(&a.input, &lookup)
                        .map_err(|e| CliError::msg(e.0))?,
                )
            } else {
                serde_json::to_string(
                    &lexer
                        .word(&a.input, &lookup)
                        .map_err(|e| CliError::msg(e.0))?,
                )
            };
            println!("{}", out.map_err(|e| CliError::msg(e.to_string()))?);
        }
        DebugCommand::IgnoreMatch { ignore_file, path } => {
            let bytes = std::fs::read(&ignore_file).map_err(|e| CliError::io(&ignore_file, e))?;
            let m = IgnoreMatcher::from_file_text(&String::from_utf8_lossy(&bytes))
                .map_err(|e| CliError::msg(format!("{}: {}", ignore_file.display(), e)))?;
            println!(
                "{}",
                if m.is_ignored(&path) {
                    "match"
                } else {
                    "nomatch"
                }
            );
        }
        DebugCommand::Ops(a) => print_ops(a)?,
        DebugCommand::Graph(a) => {
            let (name, text) = read_build_file(&a.file)?;
            let (doc, typed) = crate::syntax::parse_instructions(&name, &text)?;
            let opts = PlanOptions {
                target: a.target,
                build_args: parse_key_values(&a.build_args)?,
                ..PlanOptions::default()
            };
            let g = frontend::lower_graph(&name, &text, doc.escape, &typed, &opts)?;
            for w in &g.unused_build_args {
                eprintln!("warning: build-arg {} was not consumed by any ARG", w);
            }
            let stages: Vec<serde_json::Value> = g
                .order
                .iter()
                .map(|&i| {
                    let s = &g.stages[i];
                    serde_json::json!({
                        "index": s.index, "name": s.name, "base": s.base, "line": s.span.line,
                        "deps": s.deps.iter().map(|e| e.stage).collect::<std::collections::BTreeSet<_>>(),
                        "images": s.image_refs, "instructions": s.instructions.len(),
                    })
                })
                .collect();
            let v = serde_json::json!({ "target": g.target, "stages": stages, "levels": g.levels });
            println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| CliError::msg(e.to_string()))?
            );
        }
    }
    Ok(())
}
