//! `builder build`: the flags, and their values resolved into the pipeline's
//! [`BuildOptions`]. What a build does is `crate::pipeline`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use super::flags::{parse_entitlements, parse_secrets};
use super::{find_build_file, parse_key_values, read_build_file, CliError};
use crate::attest::provenance;
use crate::cache::remote;
use crate::epoch;
use crate::export::Output;
use crate::frontend::PlanOptions;
use crate::oci::layer::Compression;
use crate::oci::platform::Platform;
use crate::pipeline::{self, AttestLayout, AttestOptions, BuildOptions};
use crate::plan;
use crate::progress::{JsonReporter, PlainReporter, QuietReporter, Reporter, TtyReporter};
use crate::registry::{PullPolicy, Reference};
use crate::store::{default_root, normalize_name};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Tty,
    Plain,
    Json,
    Quiet,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CompressionKind {
    Gzip,
    Zstd,
}

/// `--attest-layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttestLayoutArg {
    Referrers,
    Index,
}

/// `--on-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Fail,
    Shell,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build file (default: CONTEXT/Buildfile, else Dockerfile, else Containerfile).
    #[arg(help_heading = "Build file and context", short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// An additional build context (repeatable): NAME=DIR, NAME=docker-image://REF,
    /// NAME=oci-layout://DIR[:TAG|@DIGEST], NAME=GIT-URL#REF[:SUBDIR] or NAME=https://…/TARBALL.
    /// FROM NAME, COPY --from=NAME and
    /// RUN --mount=from=NAME read it, in place of a stage or image of that name.
    #[arg(
        help_heading = "Build file and context",
        long = "build-context",
        value_name = "NAME=VALUE"
    )]
    pub build_contexts: Vec<String>,
    /// Set a build-time variable (repeatable); K alone takes its value from the environment.
    #[arg(
        help_heading = "Build arguments and target",
        long = "build-arg",
        value_name = "K[=V]"
    )]
    pub build_args: Vec<String>,
    /// Build this stage instead of the last one.
    #[arg(help_heading = "Build arguments and target", long)]
    pub target: Option<String>,
    /// Target platform (os/arch[/variant]).
    #[arg(help_heading = "Build arguments and target", long)]
    pub platform: Option<String>,
    /// When FROM pulls: `missing` (default), `always` (`--pull` alone), or `never`.
    #[arg(help_heading = "Build arguments and target", long, value_enum, default_value = "missing", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub pull: PullPolicy,
    /// Name the result in the local store (repeatable).
    #[arg(help_heading = "Outputs", short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// Outputs: oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, local:DIR, or type=...
    #[arg(help_heading = "Outputs", short = 'o', long = "output")]
    pub outputs: Vec<String>,
    /// The store (default $BUILDER_ROOT, else $XDG_DATA_HOME/builder, else ~/.local/share/builder).
    #[arg(help_heading = "Outputs", long)]
    pub root: Option<PathBuf>,
    /// Write the image (manifest) digest to this file.
    #[arg(help_heading = "Outputs", long)]
    pub iidfile: Option<PathBuf>,
    /// Write build metadata (digests, tags, layers, and each step's result and time under
    /// `builder.steps`) as JSON to this file.
    #[arg(help_heading = "Outputs", long)]
    pub metadata_file: Option<PathBuf>,
    /// Load the image into the docker daemon at $DOCKER_HOST (else /var/run/docker.sock),
    /// named by the -t names, as buildx's --load (-o type=docker).
    #[arg(help_heading = "Outputs", long)]
    pub load: bool,
    /// Push every -t name to its registry after the build.
    #[arg(help_heading = "Outputs", long)]
    pub push: bool,
    /// Set a label on the image (repeatable), as LABEL at the end of the target stage.
    #[arg(help_heading = "Image", long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Add an annotation (repeatable):
    /// [manifest|index|manifest-descriptor|index-descriptor[[PLATFORM]]:]K=V; the image
    /// manifest by default.
    #[arg(help_heading = "Image", long = "annotation", value_name = "[TYPE:]K=V")]
    pub annotations: Vec<String>,
    /// Timestamp for `created`, history and clamped mtimes: seconds, or `now`
    /// (default: $SOURCE_DATE_EPOCH, else the git HEAD commit time, else 0).
    #[arg(help_heading = "Image", long)]
    pub source_date_epoch: Option<String>,
    /// Layer compression.
    #[arg(help_heading = "Image", long, value_enum, default_value = "gzip")]
    pub compression: CompressionKind,
    /// Compression level (gzip 0-9, zstd 1-19).
    #[arg(help_heading = "Image", long)]
    pub compression_level: Option<i32>,
    /// Compress every layer of the image as --compression says, the base image's too
    /// (BuildKit's force-compression=true); otherwise inherited layers keep theirs.
    #[arg(help_heading = "Image", long)]
    pub force_compression: bool,
    /// Squash the target stage's layers since its base into one (as Buildah's --squash);
    /// the base image's layers stay as they are.
    #[arg(help_heading = "Image", long)]
    pub squash: bool,
    /// Add a name to every RUN step's /etc/hosts (repeatable): HOST:IP or HOST=IP.
    #[arg(help_heading = "RUN steps", long = "add-host", value_name = "HOST:IP")]
    pub add_hosts: Vec<String>,
    /// A resource limit of every RUN step (repeatable), as docker's: NAME=SOFT[:HARD], e.g.
    /// nofile=1024:4096; -1 is unlimited.
    #[arg(
        help_heading = "RUN steps",
        long = "ulimit",
        value_name = "NAME=SOFT[:HARD]"
    )]
    pub ulimits: Vec<String>,
    /// The size of every RUN step's /dev/shm (default 64m): bytes, or with a unit b, k, m, g.
    #[arg(help_heading = "RUN steps", long = "shm-size", value_name = "SIZE")]
    pub shm_size: Option<String>,
    /// Parallel jobs (default: the number of CPUs).
    #[arg(help_heading = "RUN steps", long)]
    pub jobs: Option<usize>,
    /// Default network for RUN: default (a namespace of its own, out through slirp4netns or
    /// pasta), none (loopback only), or host (needs --allow network.host).
    #[arg(
        help_heading = "RUN steps",
        long,
        value_enum,
        default_value = "default"
    )]
    pub network: NetworkArg,
    /// Entitlements that weaken the RUN sandbox: network.host, security.insecure (repeatable).
    #[arg(help_heading = "RUN steps", long = "allow", value_name = "ENTITLEMENT")]
    pub allow: Vec<String>,
    /// Run RUN steps with this OCI runtime (runc, crun, runsc or a path) instead of builder's
    /// built-in executor; both run the same OCI runtime spec.
    #[arg(help_heading = "RUN steps", long)]
    pub runtime: Option<PathBuf>,
    /// How RUN steps are isolated: `sandbox` (default: builder's own namespaces and Docker's
    /// default policy; where a container refuses a fresh /proc, steps share builder's PID
    /// namespace, which is printed and recorded), or `container`: inside a container that
    /// allows no namespaces (Docker's default profile, Kubernetes), the container itself is
    /// the sandbox and steps run in its root filesystem, as with Kaniko.
    #[arg(
        help_heading = "RUN steps",
        long,
        value_enum,
        default_value = "sandbox"
    )]
    pub isolation: IsolationArg,
    /// A secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR (repeatable).
    #[arg(help_heading = "RUN steps", long = "secret")]
    pub secrets: Vec<String>,
    /// An ssh agent for RUN --mount=type=ssh (repeatable): `default` ($SSH_AUTH_SOCK),
    /// ID=SOCKET, or ID=KEY[,KEY...] (the keys are loaded into an ssh-agent of the build's
    /// own). The step reaches the agent through a socket; no key enters it.
    #[arg(
        help_heading = "RUN steps",
        long = "ssh",
        value_name = "default|ID=SOCKET|ID=KEY"
    )]
    pub ssh: Vec<String>,
    /// Do not use the layer cache.
    #[arg(help_heading = "Cache", long)]
    pub no_cache: bool,
    /// Do not use the cache for these stages (repeatable).
    #[arg(help_heading = "Cache", long = "no-cache-filter", value_name = "STAGE")]
    pub no_cache_filter: Vec<String>,
    /// Import a cache: type=registry,ref=REF or type=local,src=DIR (repeatable).
    #[arg(help_heading = "Cache", long = "cache-from", value_name = "type=...")]
    pub cache_from: Vec<String>,
    /// Export the build's cache: type=registry,ref=REF[,mode=min|max] or
    /// type=local,dest=DIR[,mode=min|max] (repeatable).
    #[arg(help_heading = "Cache", long = "cache-to", value_name = "type=...")]
    pub cache_to: Vec<String>,
    /// SLSA provenance beside the image: mode=max (default: inputs and every step),
    /// mode=min (inputs only), or false.
    #[arg(
        help_heading = "Attestations and signing",
        long,
        value_name = "mode=min|max|false"
    )]
    pub provenance: Option<String>,
    /// An SPDX SBOM of the image's packages beside it: true (default) or false.
    #[arg(
        help_heading = "Attestations and signing",
        long,
        value_name = "true|false"
    )]
    pub sbom: Option<String>,
    /// Attestations in BuildKit's spelling: type=provenance[,mode=min|max][,disabled=true]
    /// or type=sbom[,disabled=true] (repeatable).
    #[arg(
        help_heading = "Attestations and signing",
        long = "attest",
        value_name = "type=..."
    )]
    pub attest: Vec<String>,
    /// How attestations travel with the image: `referrers` (default: OCI 1.1 referrers of
    /// the image, beside it in layouts and registries) or `index` (BuildKit's layout: names
    /// point at an index that lists each image and its attestation manifest).
    #[arg(
        help_heading = "Attestations and signing",
        long,
        value_enum,
        value_name = "LAYOUT",
        default_value = "referrers"
    )]
    pub attest_layout: AttestLayoutArg,
    /// Sign each image with this private key (PKCS#8 PEM, Ed25519 or EC P-256): key=FILE.
    /// The signature travels as a referrer of the image; `builder verify --key` checks it.
    #[arg(
        help_heading = "Attestations and signing",
        long,
        value_name = "key=FILE"
    )]
    pub sign: Option<String>,
    /// Refuse base images this policy (JSON: requireDigest, signedBy) does not allow,
    /// before anything runs.
    #[arg(help_heading = "Attestations and signing", long, value_name = "FILE")]
    pub base_policy: Option<PathBuf>,
    /// Build twice, in two fresh stores without cache and from a copy of the context with
    /// shuffled mtimes; succeed only when both give the same digest (else show the diff).
    #[arg(help_heading = "Checks and calls", long)]
    pub verify: bool,
    /// Evaluate the build checks (BuildKit's lint rules) and report, without building; fails
    /// when any check finds something.
    #[arg(help_heading = "Checks and calls", long)]
    pub check: bool,
    /// What to do instead of building, as buildx: `build` (default), `check` (as --check),
    /// `outline` (the target's build args, secrets and ssh mounts) or `targets` (the stages
    /// with their descriptions); `,format=json` or --format json for scripts.
    #[arg(
        help_heading = "Checks and calls",
        long,
        value_name = "build|check|outline|targets"
    )]
    pub call: Option<String>,
    /// The format of --call's report: text or json.
    #[arg(help_heading = "Checks and calls", long, value_name = "text|json")]
    pub format: Option<String>,
    /// What a failed RUN step leads to: `fail` (its state is kept for `builder debug
    /// shell ID`), or `shell`, an interactive shell in that state right away (on a terminal).
    #[arg(
        help_heading = "Progress and debugging",
        long,
        value_enum,
        value_name = "ACTION",
        default_value = "fail"
    )]
    pub on_error: OnError,
    #[arg(
        help_heading = "Progress and debugging",
        long,
        value_enum,
        default_value = "auto"
    )]
    pub progress: ProgressMode,
    /// With `--progress plain`: internal counters too (chunks compressed and reused, tar
    /// segments read from earlier layers).
    #[arg(help_heading = "Progress and debugging", long)]
    pub debug: bool,
    /// Write a Markdown summary of the build (image, names, steps run and cached, each
    /// step's result and time) to this file, for a CI job's summary page.
    #[arg(help_heading = "Progress and debugging", long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Say why each step that runs missed the cache against the build that made this image
    /// (a name or digest in the store), instead of against the last build.
    #[arg(help_heading = "Progress and debugging", long, value_name = "REF")]
    pub explain_against: Option<String>,
    /// Print only the image digest (no progress).
    #[arg(help_heading = "Progress and debugging", short = 'q', long)]
    pub quiet: bool,
    /// The build context.
    #[arg(default_value = ".")]
    pub context: PathBuf,
}

/// From `--provenance`, `--sbom` and `--attest` (later flags win). Both are on by default;
/// `BUILDX_NO_DEFAULT_ATTESTATIONS=1` turns the defaults off, as it does for buildx.
pub fn attest_options(
    provenance: Option<&str>,
    sbom: Option<&str>,
    attest: &[String],
) -> Result<AttestOptions, CliError> {
    let defaults = !std::env::var("BUILDX_NO_DEFAULT_ATTESTATIONS")
        .is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    let mut o = AttestOptions {
        provenance: defaults.then_some(provenance::Mode::Max),
        sbom: defaults,
        layout: AttestLayout::Referrers,
    };
    let bool_of = |flag: &str, v: &str| -> Result<bool, CliError> {
        match v.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            other => Err(CliError::msg(format!(
                "invalid {} {:?}: true or false",
                flag, other
            ))),
        }
    };
    // `mode=max`, `max`, `true`, `false`, `disabled=true`, comma-separated.
    let provenance_of =
        |flag: &str, fields: &[&str]| -> Result<Option<provenance::Mode>, CliError> {
            let mut mode = Some(provenance::Mode::Max);
            for f in fields {
                let (k, v) = f.split_once('=').unwrap_or(("", f));
                match (k.trim(), v.trim()) {
                    ("" | "mode", "max") => mode = mode.map(|_| provenance::Mode::Max),
                    ("" | "mode", "min") => mode = mode.map(|_| provenance::Mode::Min),
                    ("", "true" | "1") => {}
                    ("", "false" | "0") => mode = None,
                    ("disabled", v) => {
                        if bool_of(&format!("{} disabled", flag), v)? {
                            mode = None;
                        }
                    }
                    // BuildKit's options that do not change what builder records.
                    ("builder-id" | "reproducible" | "version", _) => {}
                    _ => {
                        return Err(CliError::msg(format!(
                            "invalid {} {:?}: mode=min, mode=max or false",
                            flag, f
                        )))
                    }
                }
            }
            Ok(mode)
        };
    if let Some(p) = provenance {
        let fields: Vec<&str> = p.split(',').filter(|f| !f.is_empty()).collect();
        o.provenance = provenance_of("--provenance", &fields)?;
    }
    // `true`, `false`, `disabled=true`, comma-separated; the generator is ours.
    let sbom_of = |flag: &str, fields: &[&str]| -> Result<bool, CliError> {
        let mut on = true;
        for f in fields {
            match f.split_once('=') {
                None => on = bool_of(flag, f)?,
                Some(("disabled", v)) => on = !bool_of(&format!("{} disabled", flag), v)?,
                Some(("generator", _)) => {
                    return Err(CliError::msg(format!(
                        "{} generator=...: builder scans with its own scanner",
                        flag
                    )))
                }
                Some(_) => {
                    return Err(CliError::msg(format!(
                        "invalid {} {:?}: true, false or disabled=true",
                        flag, f
                    )))
                }
            }
        }
        Ok(on)
    };
    if let Some(v) = sbom {
        let fields: Vec<&str> = v.split(',').filter(|f| !f.is_empty()).collect();
        o.sbom = sbom_of("--sbom", &fields)?;
    }
    for a in attest {
        let fields: Vec<&str> = a.split(',').filter(|f| !f.is_empty()).collect();
        let kind = fields
            .iter()
            .find_map(|f| f.strip_prefix("type="))
            .ok_or_else(|| CliError::msg(format!("invalid --attest {:?}: type= is required", a)))?;
        let rest: Vec<&str> = fields
            .iter()
            .copied()
            .filter(|f| !f.starts_with("type="))
            .collect();
        match kind {
            "provenance" => {
                o.provenance = provenance_of("--attest type=provenance", &rest)?;
            }
            "sbom" => {
                o.sbom = sbom_of("--attest type=sbom", &rest)?;
            }
            other => {
                return Err(CliError::msg(format!(
                    "invalid --attest type {:?}: provenance or sbom",
                    other
                )))
            }
        }
    }
    Ok(o)
}

/// `--call`: what it asks for, and whether as JSON.
fn call_of(a: &BuildArgs) -> Result<(String, bool), CliError> {
    let spec = a.call.clone().unwrap_or_else(|| "build".into());
    let mut parts = spec.split(',');
    let what = parts.next().unwrap_or("build").trim().to_string();
    let mut json = super::flags::json_format(a.format.as_deref().unwrap_or("text"))?;
    for p in parts {
        match p.trim().split_once('=') {
            Some(("format", f)) => json = super::flags::json_format(f)?,
            _ => {
                return Err(CliError::msg(format!(
                    "invalid --call option {:?}: format=text|json",
                    p
                )))
            }
        }
    }
    if !["build", "check", "outline", "targets"].contains(&what.as_str()) {
        return Err(CliError::msg(format!(
            "invalid --call {:?}: build, check, outline or targets",
            what
        )));
    }
    Ok((what, json))
}

pub fn run(mut a: BuildArgs) -> Result<(), CliError> {
    let (call, json) = call_of(&a)?;
    if call == "outline" || call == "targets" {
        // Nothing is built: the build file alone answers.
        let file = find_build_file(&a.context, a.file.as_ref())?;
        let (name, text) = read_build_file(&file)?;
        let (doc, typed) = crate::syntax::parse_instructions(&name, &text)?;
        let v = if call == "targets" {
            crate::frontend::outline::targets(&doc, &typed)
        } else {
            crate::frontend::outline::outline(&doc, &typed, a.target.as_deref())
                .map_err(|e| CliError::msg(format!("{}: {}", name, e)))?
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else if call == "targets" {
            print!("{}", crate::frontend::outline::render_targets(&v));
        } else {
            print!("{}", crate::frontend::outline::render_outline(&v));
        }
        return Ok(());
    }
    if call == "check" {
        a.check = true;
    }
    if a.quiet {
        a.progress = ProgressMode::Quiet;
    }
    let on_error = a.on_error;
    let root = a.root.clone();
    let secrets = a.secrets.clone();
    let finished = match pipeline::build(resolve(a)?) {
        Err(e) if on_error == OnError::Shell && e.failed_step.is_some() => {
            return Err(shell_on_error(e, root, &secrets));
        }
        r => r?,
    };
    match finished {
        pipeline::Finished::Built(digest) => println!("{}", digest),
        pipeline::Finished::Checked(findings) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "warnings": findings }))
                    .unwrap_or_default()
            );
            if !findings.is_empty() {
                return Err(CliError::exit(1));
            }
        }
        pipeline::Finished::Checked(findings) => {
            for f in &findings {
                println!("{}", f);
            }
            if !findings.is_empty() {
                return Err(CliError::msg(format!(
                    "check complete: {} warning{} found",
                    findings.len(),
                    if findings.len() == 1 { "" } else { "s" }
                )));
            }
            println!("Check complete, no warnings found.");
        }
    }
    Ok(())
}

/// `--on-error=shell`: say what failed, then open a shell in the failed step's state (on a
/// terminal); the build still fails after it.
fn shell_on_error(e: CliError, root: Option<PathBuf>, secrets: &[String]) -> CliError {
    eprint!("{}", e.report());
    let code = e.exit_code;
    let Some(id) = e.failed_step else {
        return CliError::exit(code);
    };
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("warning: --on-error=shell needs a terminal on stdin; the hint above opens the shell later");
        return CliError::exit(code);
    }
    let opened = (|| -> Result<(), CliError> {
        let store = crate::store::Store::open(&root.unwrap_or_else(crate::store::default_root))?;
        let state = crate::solver::failures::load(&store, &id).map_err(CliError::msg)?;
        let secrets = parse_secrets(secrets).map_err(CliError::msg)?;
        super::session::open_session(&store, &state, None, secrets).map(|_| ())
    })();
    if let Err(e) = opened {
        eprint!("{}", e.report());
    }
    CliError::exit(code)
}

/// The flags as values: every flag is parsed here, so the pipeline reads none.
pub(super) fn resolve(a: BuildArgs) -> Result<BuildOptions, CliError> {
    let file = find_build_file(&a.context, a.file.as_ref())?;
    let (file_name, text) = read_build_file(&file)?;
    // `--platform a,b`: one build per platform, joined in an image index.
    let platforms: Vec<Platform> = match &a.platform {
        Some(list) => {
            let mut v: Vec<Platform> = Vec::new();
            for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let parsed = Platform::parse(p).ok_or_else(|| {
                    CliError::msg(format!(
                        "invalid --platform {:?}: want os/arch[/variant][,...]",
                        p
                    ))
                })?;
                if !v.contains(&parsed) {
                    v.push(parsed);
                }
            }
            if v.is_empty() {
                return Err(CliError::msg("--platform names no platform"));
            }
            v
        }
        None => vec![Platform::host()],
    };
    let (ssh, ssh_agents) = super::flags::parse_ssh(&a.ssh).map_err(CliError::msg)?;
    let secrets = parse_secrets(&a.secrets).map_err(CliError::msg)?;
    let build_contexts = super::flags::parse_build_contexts(
        &a.build_contexts,
        &crate::solver::mounts::git_auth(&secrets, &ssh),
    )?;
    let contexts = build_contexts.contexts.clone();
    let plan = PlanOptions {
        target: a.target.clone(),
        build_args: parse_key_values(&a.build_args)?,
        target_platform: platforms[0].clone(),
        build_platform: Platform::host(),
        contexts,
    };
    let context = a
        .context
        .canonicalize()
        .map_err(|e| CliError::io(&a.context, e))?;
    let mut outputs = a
        .outputs
        .iter()
        .map(|o| Output::parse(o))
        .collect::<Result<Vec<_>, _>>()?;
    if a.load && !outputs.contains(&Output::DockerLoad) {
        outputs.push(Output::DockerLoad);
    }
    let tags = a
        .tags
        .iter()
        .map(|t| normalize_name(t))
        .collect::<Result<Vec<_>, _>>()?;
    let (epoch, _) =
        epoch::resolve(a.source_date_epoch.as_deref(), Some(&context)).map_err(CliError::msg)?;
    let compression = match a.compression {
        CompressionKind::Gzip => {
            Compression::Gzip(a.compression_level.unwrap_or(6).clamp(0, 9) as u32)
        }
        CompressionKind::Zstd => Compression::Zstd(a.compression_level.unwrap_or(3).clamp(1, 19)),
    };
    let cache_to = a
        .cache_to
        .iter()
        .map(|c| remote::parse_export(c).map_err(|e| CliError::msg(format!("--cache-to {}", e))))
        .collect::<Result<Vec<_>, _>>()?;
    for (location, options) in &cache_to {
        if *location == remote::Location::Inline && options.mode == remote::Mode::Max {
            eprintln!("warning: --cache-to type=inline holds the final stage's steps only (mode=min), as BuildKit's inline cache does; use type=registry for mode=max");
        }
    }
    let cache_from = a
        .cache_from
        .iter()
        .map(|c| remote::parse_import(c).map_err(|e| CliError::msg(format!("--cache-from {}", e))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut push_to: Vec<(String, Reference)> = Vec::new();
    if a.push {
        if tags.is_empty() {
            return Err(CliError::msg(
                "--push needs at least one -t NAME to push to",
            ));
        }
        for t in &tags {
            push_to.push((t.clone(), Reference::parse(t)?.with_default_tag()));
        }
    }
    let mut image_names: Vec<String> = Vec::new();
    let mut push_by_digest_to: Vec<Reference> = Vec::new();
    for o in &outputs {
        if let Output::Image {
            names,
            push,
            push_by_digest,
        } = o
        {
            for n in names {
                if *push_by_digest {
                    let r = Reference::parse(n)?;
                    if r.tag.is_some() || r.digest.is_some() {
                        return Err(CliError::msg(format!(
                            "-o push-by-digest=true: name={} names a tag or digest; give the repository alone",
                            n
                        )));
                    }
                    push_by_digest_to.push(r);
                    continue;
                }
                let r = Reference::parse(n)?.with_default_tag();
                image_names.push(r.familiar());
                if *push {
                    push_to.push((r.familiar(), r));
                }
            }
        }
    }
    if platforms.len() > 1 {
        if a.verify {
            return Err(CliError::msg(
                "--verify builds one platform at a time: give one --platform",
            ));
        }
        if outputs
            .iter()
            .any(|o| matches!(o, Output::DockerArchive { .. } | Output::DockerLoad))
        {
            // Refused before anything is built.
            return Err(CliError::msg(format!(
                "a docker-archive output holds one platform, and --platform names {}; build \
                 one platform for it, or write an oci: or oci-archive: output",
                platforms.len()
            )));
        }
    }
    let extra_hosts = a
        .add_hosts
        .iter()
        .map(|h| super::flags::parse_add_host(h))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::msg)?;
    let labels = super::parse_key_values(&a.labels)?.into_iter().collect();
    let sign = match &a.sign {
        None => None,
        Some(v) => {
            let file = PathBuf::from(v.strip_prefix("key=").unwrap_or(v));
            Some(Arc::new(
                crate::attest::signing::SigningKey::from_pem_file(&file).map_err(CliError::msg)?,
            ))
        }
    };
    let base_policy = match &a.base_policy {
        Some(p) => Some(pipeline::policy::BasePolicy::load(p)?),
        None => None,
    };
    let mut annotations = Vec::new();
    for a in &a.annotations {
        annotations.extend(super::flags::parse_annotation(a).map_err(CliError::msg)?);
    }
    Ok(BuildOptions {
        annotations,
        sign,
        base_policy,
        extra_hosts,
        limits: crate::plan::RunLimits {
            ulimits: a
                .ulimits
                .iter()
                .map(|u| crate::plan::Ulimit::parse(u))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CliError::msg)?,
            shm_size: match &a.shm_size {
                Some(s) => Some(
                    super::flags::parse_size(s)
                        .map_err(|e| CliError::msg(format!("invalid --shm-size {:?}: {}", s, e)))?,
                ),
                None => None,
            },
        },
        labels,
        ssh,
        ssh_agents,
        file_name,
        text,
        context,
        named_contexts: build_contexts.dirs,
        context_records: build_contexts.recorded,
        context_checkouts: build_contexts.checkouts,
        root: a.root.clone().unwrap_or_else(default_root),
        plan,
        platforms,
        check_only: a.check,
        outputs,
        tags,
        image_names,
        push_to,
        push_by_digest: push_by_digest_to,
        epoch,
        compression,
        force_compression: a.force_compression,
        squash: a.squash,
        network: match a.network {
            NetworkArg::Default => plan::Network::Sandbox,
            NetworkArg::Host => plan::Network::Host,
            NetworkArg::None => plan::Network::None,
        },
        entitlements: parse_entitlements(&a.allow).map_err(CliError::msg)?,
        executor: match &a.runtime {
            None => crate::worker::sandbox::Executor::Builtin,
            Some(r) => crate::worker::sandbox::Executor::Runtime(
                crate::worker::sandbox::runtime::resolve(r)
                    .map_err(|e| CliError::msg(e.to_string()))?,
            ),
        },
        isolation: match a.isolation {
            IsolationArg::Sandbox => crate::worker::Isolation::Sandbox,
            IsolationArg::Container => crate::worker::Isolation::Container,
        },
        keep: own_paths(&a),
        secrets,
        no_cache: a.no_cache,
        no_cache_filter: a.no_cache_filter.clone(),
        jobs: a.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        pull: a.pull,
        cache_from,
        cache_to,
        attest: AttestOptions {
            layout: match a.attest_layout {
                AttestLayoutArg::Referrers => AttestLayout::Referrers,
                AttestLayoutArg::Index => AttestLayout::Index,
            },
            ..attest_options(a.provenance.as_deref(), a.sbom.as_deref(), &a.attest)?
        },
        verify: a.verify,
        iidfile: a.iidfile.clone(),
        metadata_file: a.metadata_file.clone(),
        summary: a.summary.clone(),
        explain_against: a.explain_against.clone(),
        reporter: Arc::from(reporter_for(a.progress, a.debug)),
        file,
    })
}

/// The reporter for a `--progress` mode: `auto` draws live progress on a terminal and plain
/// lines otherwise.
pub fn reporter_for(mode: ProgressMode, debug: bool) -> Box<dyn Reporter> {
    match mode {
        ProgressMode::Json => Box::new(JsonReporter),
        ProgressMode::Quiet => Box::new(QuietReporter),
        ProgressMode::Tty => Box::new(TtyReporter::new()),
        ProgressMode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => {
            Box::new(TtyReporter::new())
        }
        _ if debug => Box::new(PlainReporter::debug()),
        _ => Box::new(PlainReporter::new()),
    }
}

/// `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkArg {
    Default,
    None,
    Host,
}

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IsolationArg {
    Sandbox,
    Container,
}

/// The host paths a build reads or writes besides its context and store: under
/// `--isolation container` no step's layout may touch them.
fn own_paths(a: &BuildArgs) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    out.extend(a.file.iter().cloned());
    out.extend(a.iidfile.iter().cloned());
    out.extend(a.metadata_file.iter().cloned());
    out.extend(a.summary.iter().cloned());
    let specs = a
        .outputs
        .iter()
        .chain(&a.secrets)
        .chain(&a.cache_to)
        .chain(&a.cache_from);
    for spec in specs {
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("dest" | "src" | "source", v)) => out.push(PathBuf::from(v)),
                Some(_) => {}
                // `oci:DIR`, `local:DIR`, `docker-archive:FILE`: the part after the scheme.
                None => {
                    if let Some((_, v)) = part.split_once(':') {
                        out.push(PathBuf::from(v));
                    }
                }
            }
        }
    }
    out.retain(|p| !p.as_os_str().is_empty() && p.as_os_str() != "-");
    out
}
