//! `builder build`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use std::sync::Arc;

use crate::attest::{provenance, sbom};
use crate::cache::remote::{self, RemoteCache};
use crate::epoch;
use crate::export::{Built, Output};
use crate::frontend::checks::{self, BaseImages, CheckInput, CheckPolicy};
use crate::frontend::{self, BaseResolver, LowerOptions, PlanOptions};
use crate::oci::digest::Digest;
use crate::oci::layer::Compression;
use crate::oci::platform::Platform;
use crate::plan::{self, OpGraph};
use crate::progress::{JsonReporter, PlainReporter, QuietReporter, Reporter, TtyReporter};
use crate::registry::{Client, PullPolicy, Reference};
use crate::solver::run::parse_secret;
use crate::solver::{self, BuildRequest};
use crate::store::{default_root, normalize_name, Store};
use crate::syntax::dockerignore;

use super::{find_build_file, parse_key_values, read_build_file, CliError};

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
    /// Do not use the cache for these stages (repeatable).
    #[arg(long = "no-cache-filter", value_name = "STAGE")]
    pub no_cache_filter: Vec<String>,
    /// Parallel jobs (default: the number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
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
    /// Timestamp for `created`, history and clamped mtimes: seconds, or `now`
    /// (default: $SOURCE_DATE_EPOCH, else the git HEAD commit time, else 0).
    #[arg(long)]
    pub source_date_epoch: Option<String>,
    /// Layer compression.
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: CompressionKind,
    /// Compression level (gzip 0-9, zstd 1-19).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Compress every layer of the image as --compression says, the base image's too
    /// (BuildKit's force-compression=true); otherwise inherited layers keep theirs.
    #[arg(long)]
    pub force_compression: bool,
    /// Default network for RUN: default (a namespace of its own, out through slirp4netns or
    /// pasta), none (loopback only), or host (needs --allow network.host).
    #[arg(long, default_value = "default")]
    pub network: String,
    /// Entitlements that weaken the RUN sandbox: network.host, security.insecure (repeatable).
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    pub allow: Vec<String>,
    /// Run RUN steps with this OCI runtime (runc, crun, runsc or a path) instead of builder's
    /// built-in executor; both run the same OCI runtime spec.
    #[arg(long)]
    pub runtime: Option<PathBuf>,
    /// How RUN steps are isolated: `sandbox` (default: builder's own namespaces and Docker's
    /// default policy; where a container refuses a fresh /proc, steps share builder's PID
    /// namespace, which is printed and recorded), or `container`: inside a container that
    /// allows no namespaces (Docker's default profile, Kubernetes), the container itself is
    /// the sandbox and steps run in its root filesystem, as with Kaniko.
    #[arg(long, value_enum, default_value = "sandbox")]
    pub isolation: IsolationArg,
    /// A secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR (repeatable).
    #[arg(long = "secret")]
    pub secrets: Vec<String>,
    /// When FROM pulls: `missing` (default), `always` (`--pull` alone), or `never`.
    #[arg(long, value_enum, default_value = "missing", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub pull: PullPolicy,
    /// Push every -t name to its registry after the build.
    #[arg(long)]
    pub push: bool,
    /// Import a cache: type=registry,ref=REF or type=local,src=DIR (repeatable).
    #[arg(long = "cache-from", value_name = "type=...")]
    pub cache_from: Vec<String>,
    /// Export the build's cache: type=registry,ref=REF[,mode=min|max] or
    /// type=local,dest=DIR[,mode=min|max] (repeatable).
    #[arg(long = "cache-to", value_name = "type=...")]
    pub cache_to: Vec<String>,
    /// Build twice, in two fresh stores without cache and from a copy of the context with
    /// shuffled mtimes; succeed only when both give the same digest (else show the diff).
    #[arg(long)]
    pub verify: bool,
    /// Evaluate the build checks (BuildKit's lint rules) and report, without building; fails
    /// when any check finds something.
    #[arg(long)]
    pub check: bool,
    /// SLSA provenance beside the image: mode=max (default: inputs and every step),
    /// mode=min (inputs only), or false.
    #[arg(long, value_name = "mode=min|max|false")]
    pub provenance: Option<String>,
    /// An SPDX SBOM of the image's packages beside it: true (default) or false.
    #[arg(long, value_name = "true|false")]
    pub sbom: Option<String>,
    /// Attestations in BuildKit's spelling: type=provenance[,mode=min|max][,disabled=true]
    /// or type=sbom[,disabled=true] (repeatable).
    #[arg(long = "attest", value_name = "type=...")]
    pub attest: Vec<String>,
    /// The build context.
    #[arg(default_value = ".")]
    pub context: PathBuf,
}

/// Which attestations a build records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttestOptions {
    pub provenance: Option<provenance::Mode>,
    pub sbom: bool,
    /// Asked for on the command line (not only the defaults): OCI layouts get them too.
    pub explicit: bool,
}

impl AttestOptions {
    /// From `--provenance`, `--sbom` and `--attest` (later flags win). Both are on by default;
    /// `BUILDX_NO_DEFAULT_ATTESTATIONS=1` turns the defaults off, as it does for buildx.
    pub fn parse(
        provenance: Option<&str>,
        sbom: Option<&str>,
        attest: &[String],
    ) -> Result<AttestOptions, CliError> {
        let defaults = !std::env::var("BUILDX_NO_DEFAULT_ATTESTATIONS")
            .is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        let mut o = AttestOptions {
            provenance: defaults.then_some(provenance::Mode::Max),
            sbom: defaults,
            explicit: false,
        };
        let mut asked = false;
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
            asked |= o.provenance.is_some();
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
            asked |= o.sbom;
        }
        for a in attest {
            let fields: Vec<&str> = a.split(',').filter(|f| !f.is_empty()).collect();
            let kind = fields
                .iter()
                .find_map(|f| f.strip_prefix("type="))
                .ok_or_else(|| {
                    CliError::msg(format!("invalid --attest {:?}: type= is required", a))
                })?;
            let rest: Vec<&str> = fields
                .iter()
                .copied()
                .filter(|f| !f.starts_with("type="))
                .collect();
            match kind {
                "provenance" => {
                    o.provenance = provenance_of("--attest type=provenance", &rest)?;
                    asked |= o.provenance.is_some();
                }
                "sbom" => {
                    o.sbom = sbom_of("--attest type=sbom", &rest)?;
                    asked |= o.sbom;
                }
                other => {
                    return Err(CliError::msg(format!(
                        "invalid --attest type {:?}: provenance or sbom",
                        other
                    )))
                }
            }
        }
        // Only a flag that turns an attestation on asks for BuildKit's layout; one that turns
        // something off does not.
        o.explicit = asked && (o.provenance.is_some() || o.sbom);
        Ok(o)
    }
}

pub fn run(a: BuildArgs) -> Result<(), CliError> {
    let file = find_build_file(&a.context, a.file.as_ref())?;
    let (name, text) = read_build_file(&file)?;
    let (doc, typed) = crate::syntax::parse_instructions(&name, &text)?;
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
    let target_platform = platforms[0].clone();
    let opts = PlanOptions {
        target: a.target.clone(),
        build_args: parse_key_values(&a.build_args)?,
        target_platform,
        build_platform: Platform::host(),
    };
    // The checks run on the parsed file before it is lowered, so that --check reports what
    // planning would refuse too.
    let context = a
        .context
        .canonicalize()
        .map_err(|e| CliError::io(&a.context, e))?;
    let (_, ignore) = dockerignore::load_for_build(&file, &context)?;
    let store = Store::open(&a.root.clone().unwrap_or_else(default_root))?;
    let policy = CheckPolicy::parse(doc.directives.check.as_deref())
        .map_err(|e| CliError::msg(format!("{}: {}", name, e)))?;
    let findings = checks::run(
        &CheckInput {
            source: &text,
            doc: &doc,
            typed: &typed,
            ignore: &ignore,
            build_args: &opts.build_args,
            target_platform: &opts.target_platform.spec(),
            platform_args: &Platform::args(&opts.target_platform, &opts.build_platform),
            bases: &StoreBases(&store, opts.target_platform.spec()),
        },
        &policy,
    );
    if a.check {
        for f in &findings {
            println!("{}", f.line_in(&name));
        }
        if findings.is_empty() {
            println!("Check complete, no warnings found.");
            return Ok(());
        }
        return Err(CliError::msg(format!(
            "check complete: {} warning{} found",
            findings.len(),
            if findings.len() == 1 { "" } else { "s" }
        )));
    }
    let graph = frontend::lower_graph(&name, &text, doc.escape, &typed, &opts)?;
    let reporter: Arc<dyn Reporter> = Arc::from(reporter_for(a.progress));
    for w in &graph.unused_build_args {
        reporter.warn(&format!("build-arg {} was not consumed by any ARG", w));
    }
    let outputs = a
        .outputs
        .iter()
        .map(|o| Output::parse(o))
        .collect::<Result<Vec<_>, _>>()?;
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
    for o in &outputs {
        if let Output::Image { names, push } = o {
            for n in names {
                let r = Reference::parse(n)?.with_default_tag();
                image_names.push(r.familiar());
                if *push {
                    push_to.push((r.familiar(), r));
                }
            }
        }
    }
    if policy.error && !findings.is_empty() {
        for f in &findings {
            reporter.check(&name, f);
        }
        let mut rules: Vec<&str> = findings.iter().map(|f| f.rule).collect();
        rules.dedup();
        return Err(CliError::msg(format!(
            "{}: lint violation found for rules: {} (# check=error=true)",
            name,
            rules.join(", ")
        )));
    }
    // Held until everything the build writes is committed (tags, pushes, the cache export,
    // every output): `cache prune` waits for it, so it never takes what this build uses.
    let _lease = crate::cache::gc::build_lease(&store)?;
    let freed = store.clean_stale_scratch();
    if freed > 0 {
        reporter.log(
            0,
            &format!("removed {} bytes of scratch that killed builds left", freed),
        );
    }
    let notices = reporter.clone();
    let registry = Arc::new(Client::from_config()?.with_notices(move |m| notices.warn(m)));
    // Layers left at registries (base images', imported caches') come through this client,
    // so the build counts what it downloads.
    store
        .blobs
        .set_source(Arc::new(crate::registry::lazy::RegistryBlobs::new(
            store.origins(),
            registry.clone(),
        )));
    let mut imported = Vec::new();
    for loc in &cache_from {
        match RemoteCache::load(loc, registry.clone(), &store) {
            Ok(Some(c)) => {
                reporter.log(0, &format!("imported cache {}: {} steps", loc, c.len()));
                imported.push(Arc::new(c));
            }
            Ok(None) => reporter.warn(&format!("no cache at {} yet: every step runs", loc)),
            Err(e) => reporter.warn(&format!(
                "cannot import the cache at {}: {} (every step runs)",
                loc, e
            )),
        }
    }
    let network = match a.network.as_str() {
        "default" => plan::Network::Sandbox,
        "host" => plan::Network::Host,
        "none" => plan::Network::None,
        other => {
            return Err(CliError::msg(format!(
                "invalid --network {:?}: default, none or host",
                other
            )))
        }
    };
    let resolver = StoreResolver {
        store: &store,
        client: &registry,
        policy: a.pull,
        reporter: reporter.as_ref(),
    };
    // The frontend lowers the stages for one platform, resolving base images (pulled as
    // --pull says) to read their configs.
    let build_args = opts.build_args.clone();
    let lower_for =
        |platform: &Platform, graph: &frontend::BuildGraph| -> Result<OpGraph, CliError> {
            Ok(frontend::lower_ops(
                graph,
                &LowerOptions {
                    file: &name,
                    source: &text,
                    escape: doc.escape,
                    build_args: &build_args,
                    platform: platform.clone(),
                    network,
                    made: Default::default(),
                },
                &resolver,
            )?)
        };
    let req = BuildRequest {
        file_name: name.clone(),
        source: text.clone(),
        graph: lower_for(&opts.target_platform, &graph)?,
        context,
        ignore,
        epoch,
        compression,
        force_compression: a.force_compression,
        platform: opts.target_platform.clone(),
        reporter: reporter.as_ref(),
        entitlements: solver::Entitlements::parse(&a.allow).map_err(CliError::msg)?,
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
        no_cache: a.no_cache,
        no_cache_filter: a.no_cache_filter.clone(),
        jobs: a.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        secrets: a
            .secrets
            .iter()
            .map(|s| parse_secret(s))
            .collect::<Result<_, _>>()
            .map_err(CliError::msg)?,
        pull: a.pull,
        registry: registry.clone(),
        cache_from: imported,
        show_platform: false,
    };
    if platforms.len() > 1 {
        if a.verify {
            return Err(CliError::msg(
                "--verify builds one platform at a time: give one --platform",
            ));
        }
        if outputs
            .iter()
            .any(|o| matches!(o, Output::DockerArchive { .. }))
        {
            // Refused before anything is built.
            return Err(CliError::msg(format!(
                "a docker-archive output holds one platform, and --platform names {}; build \
                 one platform for it, or write an oci: or oci-archive: output",
                platforms.len()
            )));
        }
    }
    // One build per platform; several run side by side (sharing --jobs) and are joined in
    // an index.
    let mut requests = Vec::new();
    for p in &platforms {
        let mut one = req.clone();
        if platforms.len() > 1 {
            one.platform = p.clone();
            one.show_platform = true;
            one.jobs = (req.jobs / platforms.len()).max(1);
            if *p != opts.target_platform {
                let graph = frontend::lower_graph(
                    &name,
                    &text,
                    doc.escape,
                    &typed,
                    &PlanOptions {
                        target_platform: p.clone(),
                        ..opts.clone()
                    },
                )?;
                one.graph = lower_for(p, &graph)?;
            }
        }
        requests.push(one);
    }
    let attest = AttestOptions::parse(a.provenance.as_deref(), a.sbom.as_deref(), &a.attest)?;
    let file_bytes = std::fs::read(&file).map_err(|e| CliError::io(&file, e))?;
    let build_file_in_context = file
        .canonicalize()
        .ok()
        .and_then(|f| {
            f.strip_prefix(&req.context)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        // Outside the context, its name alone: no absolute path goes into provenance.
        .unwrap_or_else(|| {
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| name.clone())
        });
    let invocation = provenance::Invocation {
        build_file: &build_file_in_context,
        build_file_digest: crate::oci::digest::Digest::of(&file_bytes),
        build_args: &opts.build_args,
        target: a.target.as_deref(),
        platforms: platforms.iter().map(Platform::spec).collect(),
        epoch,
        mode: attest.provenance.unwrap_or(provenance::Mode::Max),
    };
    let build_one = |one: &BuildRequest| -> Result<_, CliError> {
        Ok(if a.verify {
            verify(&store, one, reporter.as_ref(), &invocation)?
        } else {
            solver::build_recorded(&store, one)?
        })
    };
    let results: Vec<Result<_, CliError>> = if requests.len() == 1 {
        requests.iter().map(build_one).collect()
    } else {
        std::thread::scope(|scope| {
            let running: Vec<_> = requests
                .iter()
                .map(|one| scope.spawn(|| build_one(one)))
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CliError::msg("a platform's build panicked")))
                })
                .collect()
        })
    };
    let mut images = Vec::new();
    let mut steps = Vec::new();
    let mut attestations = Vec::new();
    for r in results {
        let outcome = r?;
        let statements = attestations_for(&store, &invocation, attest, &outcome)?;
        if !statements.is_empty() {
            attestations.push(
                crate::oci::image::commit_attestation(&store.blobs, &outcome.image, &statements)
                    .map_err(|e| CliError::msg(e.to_string()))?,
            );
        }
        images.push(outcome.image);
        steps.extend(outcome.steps);
    }
    // The index carrying the images with their attestations. Names and outputs get the
    // images themselves unless attestations were asked for on the command line (then, as
    // BuildKit, the index): tools that resolve a tag (umoci, oci-image-tool, a runtime) want
    // an image. A push always sends the index.
    let attested = if attestations.is_empty() {
        None
    } else {
        Some(
            crate::oci::image::commit_index(&store.blobs, &images, &attestations)
                .map_err(|e| CliError::msg(e.to_string()))?,
        )
    };
    let plain = if images.len() == 1 {
        Built::Image(images.remove(0))
    } else {
        Built::Index(
            crate::oci::image::commit_index(&store.blobs, &images, &[])
                .map_err(|e| CliError::msg(e.to_string()))?,
        )
    };
    if let Some(x) = &attested {
        store.set_attested(&plain.digest(), &x.digest)?;
    }
    let built = match &attested {
        Some(x) if attest.explicit => Built::Index(x.clone()),
        _ => plain,
    };
    let digest = built.digest();
    test_rendezvous();
    for t in tags.iter().chain(&image_names) {
        store.tag(t, &digest)?;
    }
    for (source, dest) in &push_to {
        super::registry::push_image(&store, &registry, source, dest)?;
    }
    for (loc, mode) in &cache_to {
        if a.verify {
            reporter.warn("--cache-to is ignored with --verify (its builds run without cache)");
            break;
        }
        let n = remote::export(loc, *mode, &steps, req.graph.target, &store, &registry)?;
        reporter.log(0, &format!("exported {} cached steps to {}", n, loc));
    }
    let scratch = store.scratch_dir("export-")?;
    for o in &outputs {
        built.export(&store.blobs, &tags, o, scratch.path(), attested.as_ref())?;
    }
    // What the registries cost: a build whose steps all hit, pushed to the registry that
    // holds its layers, downloads none.
    let (layers, bytes) = registry.layer_downloads();
    if layers > 0 || !cache_from.is_empty() || !push_to.is_empty() {
        reporter.log(
            0,
            &format!("layer blobs downloaded: {} ({} bytes)", layers, bytes),
        );
    }
    // What the build names: what the registry's tag names after a push (the index with the
    // attestations), else what the store's names point at.
    let digest = match &attested {
        Some(x) if !push_to.is_empty() => x.digest.clone(),
        _ => digest,
    };
    let digest = digest.to_string();
    if let Some(p) = &a.iidfile {
        std::fs::write(p, &digest).map_err(|e| CliError::io(p, e))?;
    }
    if let Some(p) = &a.metadata_file {
        let v = match &built {
            Built::Image(image) => serde_json::json!({
                "containerimage.digest": digest,
                "containerimage.config.digest": image.config_digest.to_string(),
                "image.name": tags.join(","),
                "layers": image.state.layers.iter().map(crate::oci::image::LayerRef::to_json).collect::<Vec<_>>(),
            }),
            Built::Index(index) => serde_json::json!({
                "containerimage.digest": digest,
                "image.name": tags.join(","),
                "platforms": index.images.iter().map(|i| serde_json::json!({
                    "platform": crate::oci::image::platform_of(i),
                    "containerimage.digest": i.manifest_digest.to_string(),
                })).collect::<Vec<_>>(),
            }),
        };
        let mut v = v;
        if let Some(x) = &attested {
            // The index a push sends: the images with their attestations.
            v["attestations.index.digest"] = serde_json::json!(x.digest.to_string());
        }
        std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap_or_default())
            .map_err(|e| CliError::io(p, e))?;
    }
    // As BuildKit: the checks' findings close the build's output.
    for f in &findings {
        reporter.check(&name, f);
    }
    println!("{}", digest);
    Ok(())
}

/// The statements a build's image gets: provenance and SBOM, as `attest` asks, in canonical
/// JSON (each a function of the build's inputs alone), stored as blobs: their predicate
/// types, digests and sizes.
fn attestations_for(
    store: &Store,
    invocation: &provenance::Invocation,
    attest: AttestOptions,
    outcome: &solver::Outcome,
) -> Result<Vec<(String, Digest, u64)>, CliError> {
    let image = &outcome.image;
    let platform = crate::oci::image::platform_of(image);
    let mut statements = Vec::new();
    if let Some(mode) = attest.provenance {
        let inv = provenance::Invocation {
            mode,
            platforms: invocation.platforms.clone(),
            build_file_digest: invocation.build_file_digest.clone(),
            ..*invocation
        };
        let (doc, files) =
            provenance::statement_parts(&inv, &platform, &image.manifest_digest, &outcome.trace);
        let (digest, size) = put_statement(store, &doc, &files)?;
        statements.push((provenance::PREDICATE_TYPE.to_string(), digest, size));
    }
    if attest.sbom {
        let cache = store.dir(crate::store::Bucket::Sbom);
        let mut scans = Vec::new();
        for l in &image.state.layers {
            scans.push(
                sbom::scan_cached(&store.blobs, l, &cache)
                    .map_err(|e| CliError::msg(format!("SBOM: layer {}: {}", l.digest, e)))?,
            );
        }
        let (packages, os_id) = sbom::merge(&scans);
        let doc = sbom::document(&packages, os_id.as_deref(), &platform, invocation.epoch);
        let st = sbom::statement(doc, &platform, &image.manifest_digest);
        let bytes = crate::oci::image::canonical_json(&st);
        let digest = store
            .blobs
            .put(&bytes)
            .map_err(|e| CliError::msg(e.to_string()))?;
        statements.push((sbom::PREDICATE_TYPE.to_string(), digest, bytes.len() as u64));
    }
    Ok(statements)
}

/// Store the provenance statement whose parts are `doc` and `files` (see
/// [`provenance::statement_parts`]). The digest and size of the statement a `doc` made are
/// remembered (`cache/statements/`): `doc` names the files by their digest, so while that
/// blob is in the store, a build whose inputs did not change neither writes nor hashes its
/// context's files again.
fn put_statement(store: &Store, doc: &[u8], files: &[u8]) -> Result<(Digest, u64), CliError> {
    let memo = store.memo(crate::store::Bucket::Statements);
    let memo_key = Digest::of(doc).hex().to_string();
    let remembered = memo.get(&memo_key).and_then(|b| {
        let s = String::from_utf8(b).ok()?;
        let (d, size) = s.trim().split_once(' ')?;
        Some((d.parse::<Digest>().ok()?, size.parse::<u64>().ok()?))
    });
    if let Some((d, size)) = remembered {
        if store.blobs.contains(&d) {
            return Ok((d, size));
        }
    }
    let bytes = provenance::splice_files(doc, files);
    let digest = store
        .blobs
        .put(&bytes)
        .map_err(|e| CliError::msg(e.to_string()))?;
    memo.put(
        &memo_key,
        format!("{} {}\n", digest, bytes.len()).as_bytes(),
    );
    Ok((digest, bytes.len() as u64))
}

/// Base images as the local store knows them, for the build's platform (nothing is pulled
/// for a check).
struct StoreBases<'a>(&'a Store, String);

impl BaseImages for StoreBases<'_> {
    fn env(&self, image: &str) -> Option<Vec<(String, String)>> {
        self.0.image_for(image, &self.1).ok().map(|i| i.state.env())
    }
    fn platform(&self, image: &str) -> Option<String> {
        let i = self.0.image_for(image, &self.1).ok()?;
        let c = &i.state.config;
        let mut p = format!("{}/{}", c.os(), c.architecture());
        if let Some(v) = c.variant() {
            p.push('/');
            p.push_str(v);
        }
        Some(p)
    }
}

/// Base images from the store, pulled as `--pull` says; pulls are logged.
pub(super) struct StoreResolver<'a> {
    pub store: &'a Store,
    pub client: &'a crate::registry::Client,
    pub policy: crate::registry::PullPolicy,
    pub reporter: &'a dyn Reporter,
}

impl BaseResolver for StoreResolver<'_> {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<crate::oci::image::StoredImage, Box<dyn std::error::Error + Send + Sync>> {
        let reporter = self.reporter;
        let log = move |m: &str| reporter.log(0, m);
        let pulling = crate::store::sources::Pulling {
            policy: self.policy,
            client: self.client,
            log: &log,
            layers: crate::registry::pull::Layers::WhenNeeded,
        };
        Ok(crate::store::sources::fetch(
            self.store, reference, platform, &pulling,
        )?)
    }
}

/// For the prune-race test: with `BUILDER_TEST_RENDEZVOUS=PATH`, say `PATH.solved` once the
/// graph is solved, then wait (30 s at most) for `PATH` before committing anything.
fn test_rendezvous() {
    let Some(p) = std::env::var_os("BUILDER_TEST_RENDEZVOUS").map(PathBuf::from) else {
        return;
    };
    let mut solved = p.clone().into_os_string();
    solved.push(".solved");
    let _ = std::fs::write(&solved, b"");
    for _ in 0..300 {
        if p.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The reporter for a `--progress` mode: `auto` draws live progress on a terminal and plain
/// lines otherwise.
pub fn reporter_for(mode: ProgressMode) -> Box<dyn Reporter> {
    match mode {
        ProgressMode::Json => Box::new(JsonReporter),
        ProgressMode::Quiet => Box::new(QuietReporter),
        ProgressMode::Tty => Box::new(TtyReporter::new()),
        ProgressMode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => {
            Box::new(TtyReporter::new())
        }
        _ => Box::new(PlainReporter::new()),
    }
}

/// `--verify`: two clean builds must agree; the result then goes into `store`. When they
/// disagree, their provenance explains which layers differ and why.
fn verify(
    store: &Store,
    req: &BuildRequest,
    reporter: &dyn Reporter,
    invocation: &provenance::Invocation,
) -> Result<solver::Outcome, CliError> {
    let tmp = tempfile::Builder::new()
        .prefix("builder-verify-")
        .tempdir()
        .map_err(|e| CliError::msg(format!("temporary directory: {}", e)))?;
    let stores = [
        Store::open(&tmp.path().join("a"))?,
        Store::open(&tmp.path().join("b"))?,
    ];
    for s in &stores {
        copy_base_images(store, s, &req.graph)?;
    }
    // The second build reads a copy of the context whose mtimes are all different (and later
    // than the epoch, as in a fresh checkout): mtimes must not reach the image.
    let ctx_b = tmp.path().join("context");
    crate::worker::copy_tree(&req.context, &ctx_b).map_err(|e| CliError::msg(e.to_string()))?;
    for (i, e) in walkdir::WalkDir::new(&ctx_b)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let t = req.epoch + 1 + ((i as i64).wrapping_mul(7919) % 1_000_000);
        crate::oci::unpack::set_mtime(e.path(), t);
    }
    let mut first = req.clone();
    first.no_cache = true;
    let mut second = first.clone();
    second.context = ctx_b.canonicalize().map_err(|e| CliError::io(&ctx_b, e))?;
    reporter.log(0, "--verify: first clean build");
    let a = solver::build_recorded(&stores[0], &first)?;
    reporter.log(
        0,
        "--verify: second clean build (context copy with shuffled mtimes)",
    );
    let b = solver::build_recorded(&stores[1], &second)?;
    if a.image.manifest_digest != b.image.manifest_digest {
        let report =
            crate::oci::diff::diff_images(&stores[0].blobs, &a.image, &stores[1].blobs, &b.image)
                .map_err(|e| CliError::msg(e.to_string()))?;
        eprint!("{}", crate::oci::diff::render(&report));
        let recorded = |o: &solver::Outcome| {
            let platform = crate::oci::image::platform_of(&o.image);
            let st =
                provenance::statement(invocation, &platform, &o.image.manifest_digest, &o.trace);
            provenance::read(&st).unwrap_or_default()
        };
        let why = crate::attest::explain::explain(
            &recorded(&a),
            &a.image.state.layers,
            &recorded(&b),
            &b.image.state.layers,
        );
        eprint!("{}", crate::attest::explain::render(&why));
        return Err(CliError::msg(format!(
            "not reproducible: two clean builds gave {} and {} (differences above)",
            a.image.manifest_digest, b.image.manifest_digest
        )));
    }
    reporter.log(
        0,
        &format!(
            "--verify: both clean builds gave {}",
            a.image.manifest_digest
        ),
    );
    let image = copy_image(&stores[0], store, &a.image)?;
    Ok(solver::Outcome { image, ..a })
}

/// Copy the images a build names from the local store into `to` (FROM and --from).
fn copy_base_images(from: &Store, to: &Store, graph: &OpGraph) -> Result<(), CliError> {
    let mut names: Vec<String> = Vec::new();
    for s in &graph.stages {
        names.extend(s.images());
    }
    for n in names {
        if let crate::store::sources::ImageSource::Store(name) =
            crate::store::sources::ImageSource::parse(&n)
        {
            if let Ok(img) = from.image(&name) {
                copy_image(from, to, &img)?;
                to.tag(&name, &img.manifest_digest)?;
            }
        }
    }
    Ok(())
}

/// Copy an image's blobs between stores (verified on the way) and load it from `to`.
fn copy_image(
    from: &Store,
    to: &Store,
    img: &crate::oci::image::StoredImage,
) -> Result<crate::oci::image::StoredImage, CliError> {
    let mut digests = vec![img.config_digest.clone(), img.manifest_digest.clone()];
    digests.extend(img.state.layers.iter().map(|l| l.digest.clone()));
    for d in digests {
        if to.blobs.contains(&d) {
            continue;
        }
        let p = from.blobs.ensure(&d)?;
        let mut f = std::fs::File::open(&p).map_err(|e| CliError::io(&p, e))?;
        let (got, _) = to.blobs.put_reader(&mut f)?;
        if got != d {
            return Err(CliError::msg(format!(
                "blob {} changed while copying it",
                d
            )));
        }
    }
    Ok(crate::oci::image::load(&to.blobs, &img.manifest_digest)
        .map_err(crate::store::StoreError::from)?)
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
