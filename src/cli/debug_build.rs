//! `builder debug cache|shell|export`: looking into builds that happened, for the dev loop.

use clap::{Args, Parser};

use crate::oci::platform::Platform;
use crate::solver::{explain, failures};
use crate::worker::Exit;

use super::flags::parse_secrets;
use super::images::RootArg;
use super::CliError;

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The image (a name or digest in the store) whose build to list.
    reference: String,
    /// Which platform's build, for an index (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Print JSON instead of the listing.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    root: RootArg,
}

/// `builder debug cache REF`: every step of the build that made REF, with its key, whether
/// the cache had it, and why it missed.
pub fn cache(a: CacheArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p).ok_or_else(|| {
            CliError::msg(format!(
                "--platform {}: not a platform (os/arch[/variant])",
                p
            ))
        })?,
        None => Platform::host(),
    };
    let image = store
        .image_for(&a.reference, &platform.spec())
        .map_err(|e| CliError::msg(format!("{}: {}", a.reference, e)))?;
    let steps = explain::steps_of_image(&store, &image.manifest_digest).ok_or_else(|| {
        CliError::msg(format!(
            "{}: the store has no record of the build that made {} (an imported or pulled image, or one built before builds were recorded)",
            a.reference, image.manifest_digest
        ))
    })?;
    if a.json {
        let v = serde_json::json!({
            "image": image.manifest_digest.to_string(),
            "platform": platform.spec(),
            "steps": steps,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| CliError::msg(e.to_string()))?
        );
        return Ok(());
    }
    println!("{} ({})", image.manifest_digest, platform.spec());
    for s in &steps {
        let key = s.key.strip_prefix("sha256:").unwrap_or(&s.key);
        println!(
            "[stage-{} line {}] {} {:>7.2}s  {:.12}  {}",
            s.stage,
            s.line,
            if s.cached { "CACHED" } else { "RAN   " },
            s.seconds,
            key,
            crate::text::abbreviate(&s.instruction, 200)
        );
        if let Some(why) = &s.miss {
            println!("    cache miss: {}", why);
        }
    }
    let ran = steps.iter().filter(|s| !s.cached).count();
    println!(
        "{} steps: {} ran, {} cached",
        steps.len(),
        ran,
        steps.len() - ran
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The failed step (its id, or a unique prefix of it, as the build's error names it).
    #[arg(required_unless_present = "target", conflicts_with = "target")]
    id: Option<String>,
    /// Instead of a failed step, the final state of this stage of the build file in the
    /// current directory (built first, as `builder build --target STAGE` would).
    #[arg(long, value_name = "STAGE")]
    target: Option<String>,
    /// With --target: the build file.
    #[arg(short = 'f', long = "file", requires = "target")]
    file: Option<std::path::PathBuf>,
    /// With --target: a build arg (repeatable).
    #[arg(long = "build-arg", value_name = "K=V", requires = "target")]
    build_args: Vec<String>,
    /// With --target: the build context (default: the current directory).
    #[arg(long, requires = "target")]
    context: Option<std::path::PathBuf>,
    /// A secret to mount again: id=ID,src=FILE or id=ID,env=VAR (repeatable). A step's
    /// secret is only mounted when it is given here.
    #[arg(long = "secret")]
    secrets: Vec<String>,
    #[command(flatten)]
    root: RootArg,
    /// Run this command instead of an interactive shell: `-- CMD ARGS...`.
    #[arg(last = true)]
    command: Vec<String>,
}

/// `builder debug shell`: an interactive shell (or one command) in a failed step's state,
/// or in a stage's final state, under the step's own sandbox.
pub fn shell(a: ShellArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    let state = match (&a.id, &a.target) {
        (Some(id), _) => failures::load(&store, id).map_err(CliError::msg)?,
        (None, Some(stage)) => stage_state(&a, stage, &store)?,
        (None, None) => return Err(CliError::msg("name a failed step, or --target STAGE")),
    };
    let secrets = parse_secrets(&a.secrets).map_err(CliError::msg)?;
    crate::solver::enter_debug_host().map_err(CliError::msg)?;
    let command = (!a.command.is_empty()).then(|| a.command.clone());
    let exit = super::session::open_session(&store, &state, command, secrets)?;
    exit_with(exit)
}

/// End as the session's command ended (a signal as a shell reports it, 128+N).
fn exit_with(exit: Exit) -> Result<(), CliError> {
    let code = match exit {
        Exit::Code(0) => return Ok(()),
        Exit::Code(c) => c,
        Exit::Signal(s) => 128 + s,
    };
    Err(CliError::exit(code))
}

/// `--target STAGE`: build the stage (steps come from the cache when they can), and take
/// its final state.
fn stage_state(
    a: &ShellArgs,
    stage: &str,
    store: &crate::store::Store,
) -> Result<failures::DebugState, CliError> {
    let context = a.context.clone().unwrap_or_else(|| ".".into());
    let mut argv: Vec<std::ffi::OsString> = vec![
        "builder".into(),
        "build".into(),
        "--target".into(),
        stage.into(),
    ];
    if let Some(f) = &a.file {
        argv.extend(["-f".into(), f.clone().into_os_string()]);
    }
    for b in &a.build_args {
        argv.extend(["--build-arg".into(), b.into()]);
    }
    argv.extend(["--root".into(), store.root().as_os_str().to_owned()]);
    argv.push(context.clone().into_os_string());
    let args = match super::Cli::try_parse_from(argv) {
        Ok(super::Cli {
            command: super::Command::Build(args),
        }) => *args,
        Ok(_) => return Err(CliError::msg("internal: not a build")),
        Err(e) => return Err(CliError::msg(e.to_string())),
    };
    let digest = match crate::pipeline::build(super::build::resolve(args)?)? {
        crate::pipeline::Finished::Built(d) => d,
        crate::pipeline::Finished::Checked(_) => {
            return Err(CliError::msg("internal: a check instead of a build"))
        }
    };
    let image = store.image(&digest)?;
    let context = std::fs::canonicalize(&context).map_err(|e| CliError::io(&context, e))?;
    Ok(failures::stage_state(&image, stage, &context))
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The failed step (its id, or a unique prefix of it).
    id: String,
    /// Where its files go (a directory, made if missing).
    #[arg(required_unless_present = "output", conflicts_with = "output")]
    dest: Option<std::path::PathBuf>,
    /// As `builder build -o`: type=local,dest=DIR.
    #[arg(short = 'o', long = "output")]
    output: Option<String>,
    #[command(flatten)]
    root: RootArg,
}

/// `builder debug export ID DIR`: a failed step's files (the layers it ran on with what it
/// wrote) into a directory.
pub fn export(a: ExportArgs) -> Result<(), CliError> {
    let dest = match (&a.dest, &a.output) {
        (Some(d), _) => d.clone(),
        (None, Some(o)) => local_dest(o)?,
        (None, None) => return Err(CliError::msg("name a directory")),
    };
    let store = a.root.open()?;
    let state = failures::load(&store, &a.id).map_err(CliError::msg)?;
    crate::solver::enter_debug_host().map_err(CliError::msg)?;
    if dest.exists()
        && std::fs::read_dir(&dest)
            .map_err(|e| CliError::io(&dest, e))?
            .next()
            .is_some()
    {
        return Err(CliError::msg(format!(
            "{}: not empty (the failed state is written into an empty or new directory)",
            dest.display()
        )));
    }
    failures::export(&store, &state, &dest).map_err(CliError::msg)?;
    eprintln!("exported the state of {} to {}", state.id, dest.display());
    Ok(())
}

/// `type=local,dest=DIR` (the only output a failed state has).
fn local_dest(o: &str) -> Result<std::path::PathBuf, CliError> {
    let mut dest = None;
    for field in o.split(',') {
        match field.split_once('=') {
            Some(("type", "local")) => {}
            Some(("dest", d)) => dest = Some(std::path::PathBuf::from(d)),
            _ => {
                return Err(CliError::msg(format!(
                    "-o {}: a failed state exports as type=local,dest=DIR",
                    o
                )))
            }
        }
    }
    dest.ok_or_else(|| CliError::msg(format!("-o {}: dest= is required", o)))
}
