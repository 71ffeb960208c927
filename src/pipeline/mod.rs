//! The build pipeline, in one readable sequence: parse and check the build file, lower it to
//! one op graph per platform, take the store's lease, solve, attest, make the index, tag,
//! push, export the cache, write the outputs and the metadata. It takes [`BuildOptions`],
//! values the command line resolved from its flags; it reads no flag text.

mod attestations;
mod bases;
pub mod policy;
pub mod rebuild;
mod summary;
mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::attest::provenance;
use crate::cache::remote::{self, ExportOptions, Location, RemoteCache};
use crate::export::{Built, Output};
use crate::failure::{build_failure, CliError};
use crate::frontend::checks::{self, CheckInput, CheckPolicy};
use crate::frontend::{self, LowerOptions, PlanOptions};
use crate::oci::image::StoredIndex;
use crate::oci::layer::Compression;
use crate::oci::platform::Platform;
use crate::plan::{self, OpGraph};
use crate::progress::Reporter;
use crate::registry::{push, Client, PullPolicy, Reference};
use crate::solver::mounts::SecretSource;
use crate::solver::{self, BuildRequest, Entitlements};
use crate::store::Store;
use crate::syntax::dockerignore;

pub use attestations::{AttestLayout, AttestOptions};
pub use bases::StoreResolver;
pub use rebuild::recorded_provenance;

/// Where an `--annotation` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationLevel {
    /// The image manifest.
    Manifest,
    /// The index of a multi-platform build.
    Index,
    /// The index's descriptor of each image.
    ManifestDescriptor,
    /// The descriptor of what the build made in an `oci:` or `oci-archive:` output's
    /// index.json.
    IndexDescriptor,
}

/// One `--annotation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    pub level: AnnotationLevel,
    /// Only this platform's image (`os/arch[/variant]`).
    pub platform: Option<String>,
    pub key: String,
    pub value: String,
}

impl Annotation {
    /// The `--annotation` value that gives it.
    pub fn flag(&self) -> String {
        let level = match self.level {
            AnnotationLevel::Manifest => "manifest",
            AnnotationLevel::Index => "index",
            AnnotationLevel::ManifestDescriptor => "manifest-descriptor",
            AnnotationLevel::IndexDescriptor => "index-descriptor",
        };
        match &self.platform {
            Some(p) => format!("{}[{}]:{}={}", level, p, self.key, self.value),
            None => format!("{}:{}={}", level, self.key, self.value),
        }
    }

    /// Whether it is at `level` and for `platform`.
    fn applies(&self, level: AnnotationLevel, platform: &str) -> bool {
        self.level == level && self.platform.as_deref().is_none_or(|p| p == platform)
    }
}

/// The annotations at `level` for `platform`, as a map.
fn annotations_at(
    list: &[Annotation],
    level: AnnotationLevel,
    platform: &str,
) -> BTreeMap<String, String> {
    list.iter()
        .filter(|a| a.applies(level, platform))
        .map(|a| (a.key.clone(), a.value.clone()))
        .collect()
}

/// Everything a build is asked to do, resolved from the command line.
pub struct BuildOptions {
    /// The build file, its name as the user gave it, and its text.
    pub file: PathBuf,
    pub file_name: String,
    pub text: String,
    /// The context, absolute.
    pub context: PathBuf,
    /// `--build-context NAME=DIR`s, by looked-up name, absolute.
    pub named_contexts: BTreeMap<String, PathBuf>,
    /// What the provenance records of each `--build-context`: `docker-image://REF`,
    /// `oci-layout://DIR…`, a git checkout's `URL#COMMIT[:SUBDIR]`, or `local`.
    pub context_records: BTreeMap<String, String>,
    /// The git checkouts among them, kept while the build runs.
    pub context_checkouts: Vec<Arc<tempfile::TempDir>>,
    /// The store (`--root`).
    pub root: PathBuf,
    /// The target, the build args and the first platform.
    pub plan: PlanOptions,
    /// Every platform to build (one image each, joined in an index when several).
    pub platforms: Vec<Platform>,
    /// `--check`: report the checks' findings, build nothing.
    pub check_only: bool,
    pub outputs: Vec<Output>,
    /// Names in the local store (`-t`), normalized.
    pub tags: Vec<String>,
    /// Names outputs of `type=image` give, and what is pushed where.
    pub image_names: Vec<String>,
    pub push_to: Vec<(String, Reference)>,
    /// `-o type=image,push-by-digest=true`: repositories the image goes to by digest alone.
    pub push_by_digest: Vec<Reference>,
    pub epoch: i64,
    pub compression: Compression,
    pub force_compression: bool,
    /// `--squash`: the target stage's layers since its base become one.
    pub squash: bool,
    pub network: plan::Network,
    /// `--add-host`: extra /etc/hosts entries of every RUN.
    pub extra_hosts: Vec<(String, String)>,
    /// `--ulimit` and `--shm-size` of every RUN.
    pub limits: plan::RunLimits,
    /// `--ssh`: each id's agent socket.
    pub ssh: BTreeMap<String, PathBuf>,
    /// The agents started for `--ssh ID=KEY`, kept running while the build is.
    pub ssh_agents: Vec<Arc<crate::solver::ssh::KeyAgent>>,
    /// `--label`: labels set on the image.
    pub labels: Vec<(String, String)>,
    /// `--annotation`: annotations on the manifests, the index and its descriptors.
    pub annotations: Vec<Annotation>,
    pub entitlements: Entitlements,
    pub executor: crate::worker::sandbox::Executor,
    pub isolation: crate::worker::Isolation,
    /// Host paths `--isolation container` never lays out over.
    pub keep: Vec<PathBuf>,
    pub secrets: BTreeMap<String, SecretSource>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    pub jobs: usize,
    pub pull: PullPolicy,
    pub cache_from: Vec<Location>,
    pub cache_to: Vec<(Location, ExportOptions)>,
    pub attest: AttestOptions,
    /// `--sign key=FILE`: each image gets a signature by this key, as a referrer.
    pub sign: Option<Arc<crate::attest::signing::SigningKey>>,
    /// `--base-policy FILE`: what every base image must be (pinned, signed).
    pub base_policy: Option<policy::BasePolicy>,
    /// `--verify`: two clean builds must agree.
    pub verify: bool,
    pub iidfile: Option<PathBuf>,
    pub metadata_file: Option<PathBuf>,
    /// `--summary`: a Markdown summary for a CI job's page.
    pub summary: Option<PathBuf>,
    /// `--explain-against`: the image whose build misses are compared with.
    pub explain_against: Option<String>,
    pub reporter: Arc<dyn Reporter>,
}

/// How a build ended, for the command line to print.
pub enum Finished {
    /// `--check`: the findings, one line each; nothing was built.
    Checked(Vec<String>),
    /// The digest the build names.
    Built(String),
}

/// Run the build `o` describes.
pub fn build(o: BuildOptions) -> Result<Finished, CliError> {
    let started = std::time::Instant::now();
    let (name, text) = (&o.file_name, &o.text);
    let (doc, typed) = crate::syntax::parse_instructions(name, text)?;
    let reporter = o.reporter.clone();
    // The checks run on the parsed file before it is lowered, so that --check reports what
    // planning would refuse too.
    let (_, ignore) = dockerignore::load_for_build(&o.file, &o.context)?;
    let store = Store::open(&o.root)?;
    // As BuildKit: the build arg replaces the directive.
    let policy = match o.plan.build_args.get("BUILDKIT_DOCKERFILE_CHECK") {
        Some(value) => CheckPolicy::parse(Some(value))
            .map_err(|e| CliError::msg(format!("--build-arg BUILDKIT_DOCKERFILE_CHECK: {}", e)))?,
        None => CheckPolicy::parse(doc.directives.check.as_deref())
            .map_err(|e| CliError::msg(format!("{}: {}", name, e)))?,
    };
    let run_checks = |store: &Store| {
        checks::run(
            &CheckInput {
                source: text,
                doc: &doc,
                typed: &typed,
                ignore: &ignore,
                build_args: &o.plan.build_args,
                target_platform: &o.plan.target_platform.spec(),
                platform_args: &Platform::args(&o.plan.target_platform, &o.plan.build_platform),
                bases: &bases::StoreBases(store, o.plan.target_platform.spec(), &o.plan.contexts),
            },
            &policy,
        )
    };
    let findings = run_checks(&store);
    if o.check_only {
        return Ok(Finished::Checked(
            findings.iter().map(|f| f.line_in(name)).collect(),
        ));
    }
    let graph = frontend::lower_graph(name, text, doc.escape, &typed, &o.plan)?;
    for w in &graph.unused_build_args {
        reporter.warn(&format!("build-arg {} was not consumed by any ARG", w));
    }
    if policy.error && !findings.is_empty() {
        for f in &findings {
            reporter.check(name, f);
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
    let shown = reporter.clone();
    let totals = crate::progress::Totals::default();
    let registry = Arc::new(
        Client::from_config()?
            .with_notices(move |m| notices.warn(m))
            .with_transfers(move |t| {
                let kind = match t.direction {
                    crate::registry::Direction::Pull => "pull",
                    crate::registry::Direction::Push => "push",
                };
                let (done, total) = totals.update(kind, &t.digest.to_string(), t.done, t.total);
                shown.bytes(0, kind, done, Some(total));
            }),
    );
    // Layers left at registries (base images', imported caches') come through this client,
    // so the build counts what it downloads.
    store
        .blobs
        .set_source(Arc::new(crate::registry::lazy::RegistryBlobs::new(
            store.origins(),
            registry.clone(),
        )));
    let imported = import_caches(&o.cache_from, &registry, &store, reporter.as_ref());

    // Lowering, per platform: base images are resolved (pulled as --pull says) to read their
    // configs.
    let resolver = StoreResolver {
        store: &store,
        client: &registry,
        policy: o.pull,
        reporter: reporter.as_ref(),
    };
    let lower_for =
        |platform: &Platform, graph: &frontend::BuildGraph| -> Result<OpGraph, CliError> {
            Ok(frontend::lower_ops(
                graph,
                &LowerOptions {
                    file: name,
                    source: text,
                    escape: doc.escape,
                    build_args: &o.plan.build_args,
                    platform: platform.clone(),
                    network: o.network,
                    extra_hosts: o.extra_hosts.clone(),
                    limits: o.limits.clone(),
                    made: Default::default(),
                },
                &resolver,
            )?)
        };
    // Each named local context with its own `.dockerignore`, as buildx reads it.
    let mut named_contexts = BTreeMap::new();
    for (name, dir) in &o.named_contexts {
        let (_, ignore) = dockerignore::load_for_build(std::path::Path::new("/"), dir)?;
        named_contexts.insert(
            name.clone(),
            crate::context::SourceRoot::context(dir.clone(), ignore),
        );
    }
    let req = BuildRequest {
        file_name: name.clone(),
        graph: lower_for(&o.plan.target_platform, &graph)?,
        context: o.context.clone(),
        ignore: ignore.clone(),
        named_contexts,
        ssh: o.ssh.clone(),
        epoch: o.epoch,
        compression: o.compression,
        force_compression: o.force_compression,
        squash: o.squash,
        platform: o.plan.target_platform.clone(),
        reporter: reporter.as_ref(),
        entitlements: o.entitlements,
        executor: o.executor.clone(),
        isolation: o.isolation,
        keep: o.keep.clone(),
        no_cache: o.no_cache,
        no_cache_filter: o.no_cache_filter.clone(),
        jobs: o.jobs,
        secrets: o.secrets.clone(),
        pull: o.pull,
        registry: registry.clone(),
        cache_from: imported,
        show_platform: false,
        explain_against: None,
        labels: o.labels.clone(),
    };
    // One build per platform; several run side by side (sharing --jobs) and are joined in
    // an index.
    let mut requests = Vec::new();
    for p in &o.platforms {
        let mut one = req.clone();
        if o.platforms.len() > 1 {
            one.platform = p.clone();
            one.show_platform = true;
            one.jobs = (req.jobs / o.platforms.len()).max(1);
            if *p != o.plan.target_platform {
                let graph = frontend::lower_graph(
                    name,
                    text,
                    doc.escape,
                    &typed,
                    &PlanOptions {
                        target_platform: p.clone(),
                        ..o.plan.clone()
                    },
                )?;
                one.graph = lower_for(p, &graph)?;
            }
        }
        if let Some(r) = &o.explain_against {
            one.explain_against = Some(explained_image(&store, r, &one.platform)?);
        }
        requests.push(one);
    }

    // The base-image policy, before anything runs.
    if let Some(policy) = &o.base_policy {
        let quiet = |_: &str| {};
        let local = crate::store::sources::Pulling {
            policy: PullPolicy::Never,
            client: &registry,
            log: &quiet,
            layers: crate::registry::pull::Layers::WhenNeeded,
        };
        for one in &requests {
            // Each base once per platform, however many stages name it.
            let references: std::collections::BTreeSet<String> =
                one.graph.stages.iter().flat_map(|s| s.images()).collect();
            for reference in references {
                let image =
                    crate::store::sources::fetch(&store, &reference, &one.platform, &local)?;
                policy.check(&store, &registry, &reference, &image)?;
            }
        }
    }

    // Solve.
    let invocation = provenance::Invocation {
        build_file: &attestations::build_file_in_context(&o.file, &o.context, name),
        build_file_digest: crate::oci::digest::Digest::of(
            &std::fs::read(&o.file).map_err(|e| CliError::io(&o.file, e))?,
        ),
        build_args: &o.plan.build_args,
        target: o.plan.target.as_deref(),
        platforms: o.platforms.iter().map(Platform::spec).collect(),
        epoch: o.epoch,
        mode: o.attest.provenance.unwrap_or(provenance::Mode::Max),
        options: recorded_options(&o),
    };
    // One solver for every platform: an identical step of two platforms runs once.
    let solver = solver::Solver::new(&store);
    let build_one = |one: &BuildRequest| -> Result<solver::Outcome, CliError> {
        if o.verify {
            verify::verify(&store, one, reporter.as_ref(), &invocation, text)
        } else {
            solver.build(one).map_err(|e| build_failure(e, text))
        }
    };
    let results = each_platform(&requests, build_one);

    // Attestations, and the index that carries them.
    let Committed {
        built,
        attested,
        steps,
        timings,
    } = commit(
        &store,
        &invocation,
        o.attest,
        o.sign.as_deref(),
        &o.annotations,
        o.cache_to.iter().any(|(l, _)| *l == Location::Inline),
        results,
    )?;
    let digest = built.digest();
    test_rendezvous();

    // Tags, pushes, the cache export, the outputs.
    for t in o.tags.iter().chain(&o.image_names) {
        store.tag(t, &digest)?;
    }
    for (source, dest) in &o.push_to {
        let pushed = push_image(&store, &registry, source, dest)?;
        reporter.log(0, &pushed_line(dest, &pushed));
    }
    for repository in &o.push_by_digest {
        // What a tag push would send, by its digest (its attestations go as referrers).
        let dest = Reference {
            tag: None,
            digest: Some(digest.clone()),
            ..repository.clone()
        };
        let pushed = push_image(&store, &registry, &digest.to_string(), &dest)?;
        reporter.log(0, &pushed_line(&dest, &pushed));
    }
    let mounts = cache_mounts_of(&requests, &store);
    for (loc, options) in &o.cache_to {
        if o.verify {
            reporter.warn("--cache-to is ignored with --verify (its builds run without cache)");
            break;
        }
        let n = remote::export(
            loc,
            *options,
            &steps,
            req.graph.target,
            &mounts,
            &store,
            &registry,
        )?;
        reporter.log(0, &format!("exported {} cached steps to {}", n, loc));
    }
    let scratch = store.scratch_dir("export-")?;
    let descriptor_annotations: BTreeMap<String, String> = o
        .annotations
        .iter()
        .filter(|a| a.level == AnnotationLevel::IndexDescriptor)
        .map(|a| (a.key.clone(), a.value.clone()))
        .collect();
    for out in &o.outputs {
        built.export(
            &store.blobs,
            &o.tags,
            out,
            scratch.path(),
            attested.as_ref(),
            &descriptor_annotations,
        )?;
    }
    // What the registries cost: a build whose steps all hit, pushed to the registry that
    // holds its layers, downloads none.
    let (layers, bytes) = registry.layer_downloads();
    if layers > 0
        || !o.cache_from.is_empty()
        || !o.push_to.is_empty()
        || !o.push_by_digest.is_empty()
    {
        reporter.log(
            0,
            &format!("layer blobs downloaded: {} ({} bytes)", layers, bytes),
        );
    }

    // What the build names: what the store's names and a registry's tag point at.
    let digest = digest.to_string();
    if let Some(p) = &o.iidfile {
        std::fs::write(p, &digest).map_err(|e| CliError::io(p, e))?;
    }
    if let Some(p) = &o.metadata_file {
        write_metadata(p, &digest, &built, &o.tags, attested.as_ref(), &timings)?;
    }
    if let Some(p) = &o.summary {
        let names: Vec<String> = o.tags.iter().chain(&o.image_names).cloned().collect();
        let text = summary::markdown(&digest, &names, &timings, started.elapsed());
        std::fs::write(p, text).map_err(|e| CliError::io(p, e))?;
    }
    let steps: Vec<&crate::attest::trace::StepTrace> =
        timings.iter().flat_map(|p| &p.steps).collect();
    let cached = steps.iter().filter(|s| s.cached).count();
    reporter.summary(&crate::progress::Summary {
        digest: digest.clone(),
        names: o.tags.iter().chain(&o.image_names).cloned().collect(),
        image_bytes: image_bytes(&built),
        steps_run: steps.len() - cached,
        steps_cached: cached,
        bytes_pulled: registry.layer_downloads().1,
        bytes_pushed: registry.uploads(),
        seconds: started.elapsed().as_secs_f64(),
    });
    // As BuildKit: the checks' findings close the build's output. The bases the build
    // pulled are in the store now, so the rules that read a base's config (its platform,
    // its environment) see those too, as BuildKit's, which resolves every base first.
    let findings = run_checks(&store);
    for f in &findings {
        reporter.check(name, f);
    }
    Ok(Finished::Built(digest))
}

/// The settings provenance records beside the build file and args: those that shape the
/// image, each only when it is not the default.
fn recorded_options(o: &BuildOptions) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let mut m = serde_json::Map::new();
    if !o.labels.is_empty() {
        let labels: BTreeMap<&String, &String> = o.labels.iter().map(|(k, v)| (k, v)).collect();
        m.insert("labels".into(), json!(labels));
    }
    if !o.limits.ulimits.is_empty() {
        let list: Vec<String> = o
            .limits
            .ulimits
            .iter()
            .map(|u| format!("{}={}:{}", u.name, u.soft, u.hard))
            .collect();
        m.insert("ulimits".into(), json!(list));
    }
    if let Some(size) = o.limits.shm_size {
        m.insert("shmSize".into(), json!(size));
    }
    if !o.extra_hosts.is_empty() {
        let hosts: Vec<String> = o
            .extra_hosts
            .iter()
            .map(|(h, ip)| format!("{}={}", h, ip))
            .collect();
        m.insert("addHosts".into(), json!(hosts));
    }
    match o.network {
        plan::Network::Sandbox => {}
        plan::Network::None => {
            m.insert("network".into(), json!("none"));
        }
        plan::Network::Host => {
            m.insert("network".into(), json!("host"));
        }
    }
    let compression = o.compression.key();
    if compression != Compression::Gzip(6).key() {
        m.insert("compression".into(), json!(compression));
    }
    if o.force_compression {
        m.insert("forceCompression".into(), json!(true));
    }
    if o.squash {
        m.insert("squash".into(), json!(true));
    }
    if !o.annotations.is_empty() {
        let list: Vec<String> = o.annotations.iter().map(Annotation::flag).collect();
        m.insert("annotations".into(), json!(list));
    }
    if !o.context_records.is_empty() {
        m.insert("buildContexts".into(), json!(o.context_records));
    }
    m
}

/// The `RUN --mount=type=cache` mounts the build's steps name that have contents here: each
/// mount's key and directory.
fn cache_mounts_of(requests: &[BuildRequest], store: &Store) -> Vec<(String, PathBuf)> {
    let bucket = store.dir(crate::store::Bucket::CacheMounts);
    let mut out = std::collections::BTreeMap::new();
    for r in requests {
        for stage in &r.graph.stages {
            for op in &stage.ops {
                let plan::Action::Exec(e) = &op.action else {
                    continue;
                };
                for m in e.mounts.iter().filter(|m| m.kind == plan::MountKind::Cache) {
                    let key = solver::mounts::cache_mount_key(m);
                    let dir = bucket.join(&key);
                    if dir.is_dir() {
                        out.insert(key, dir);
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The stored size of what the build made: every image's layers and manifest.
fn image_bytes(built: &Built) -> u64 {
    let images: Vec<&crate::oci::image::StoredImage> = match built {
        Built::Image(image) => vec![image],
        Built::Index(index) => index.images.iter().collect(),
    };
    images
        .iter()
        .map(|i| i.state.layers.iter().map(|l| l.size).sum::<u64>() + i.manifest_size)
        .sum()
}

/// `build_one` of every request: side by side when there are several.
fn each_platform(
    requests: &[BuildRequest],
    build_one: impl Fn(&BuildRequest) -> Result<solver::Outcome, CliError> + Sync,
) -> Vec<Result<solver::Outcome, CliError>> {
    if requests.len() == 1 {
        return requests.iter().map(build_one).collect();
    }
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
}

/// `--explain-against REF`: the image of `platform` that `reference` names, whose build
/// left a record.
fn explained_image(
    store: &Store,
    reference: &str,
    platform: &Platform,
) -> Result<crate::oci::digest::Digest, CliError> {
    let image = store
        .image_for(reference, &platform.spec())
        .map_err(|e| CliError::msg(format!("--explain-against {}: {}", reference, e)))?;
    if solver::explain::load_for_image(store, &image.manifest_digest).is_none() {
        return Err(CliError::msg(format!(
            "--explain-against {}: the store has no record of the build that made {} ({}); builds record their steps from this version on",
            reference,
            image.manifest_digest,
            platform.spec()
        )));
    }
    Ok(image.manifest_digest)
}

/// Commit the builds' images with their attestations: what names and outputs get, the index
/// with the attestations (if any), and every step's cache record.
fn commit(
    store: &Store,
    invocation: &provenance::Invocation,
    attest: AttestOptions,
    sign: Option<&crate::attest::signing::SigningKey>,
    annotations: &[Annotation],
    inline_cache: bool,
    results: Vec<Result<solver::Outcome, CliError>>,
) -> Result<Committed, CliError> {
    let mut images = Vec::new();
    let mut steps = Vec::new();
    let mut attested_images = Vec::new();
    let mut timings = Vec::new();
    for r in results {
        let mut outcome = r?;
        // The image's own cache records (in its config) and its manifest annotations: the
        // image is written again, once, when it gets either.
        let platform = crate::oci::image::platform_of(&outcome.image);
        let manifest_annotations =
            annotations_at(annotations, AnnotationLevel::Manifest, &platform);
        if inline_cache || !manifest_annotations.is_empty() {
            let mut state = outcome.image.state.clone();
            if inline_cache {
                let records = crate::cache::remote::inline_records(
                    &outcome.steps,
                    outcome.trace.target_stage,
                    &outcome.image.state.layers,
                    store,
                )?;
                state
                    .extra
                    .insert(crate::oci::image::INLINE_CACHE_FIELD.to_string(), records);
            }
            outcome.image = state
                .commit(&store.blobs, &manifest_annotations)
                .map_err(|e| CliError::msg(e.to_string()))?;
        }
        solver::explain::keep_for_image(
            store,
            &outcome.record,
            &outcome.image.manifest_digest,
            &outcome.trace.steps,
        );
        timings.push(summary::Platform {
            platform,
            steps: outcome.trace.steps.clone(),
        });
        let statements = attestations::statements(store, invocation, attest, &outcome)?;
        if !statements.is_empty() {
            attested_images.push(
                crate::oci::image::commit_attestation(&store.blobs, &outcome.image, &statements)
                    .map_err(|e| CliError::msg(e.to_string()))?,
            );
        }
        if let Some(key) = sign {
            attested_images.push(attestations::signature(store, key, &outcome.image)?);
        }
        images.push(outcome.image);
        steps.extend(outcome.steps);
    }
    // Names and outputs get the images themselves, the attestations travelling beside them as
    // referrers (tools that resolve a tag, umoci, oci-image-tool, a runtime, want an image),
    // unless `--attest-layout=index` asks for BuildKit's index.
    let attested = if attested_images.is_empty() {
        None
    } else {
        Some(
            crate::oci::image::commit_index(&store.blobs, &images, &attested_images)
                .map_err(|e| CliError::msg(e.to_string()))?,
        )
    };
    let plain = if images.len() == 1 {
        Built::Image(images.remove(0))
    } else {
        let descriptors: Vec<BTreeMap<String, String>> = images
            .iter()
            .map(|i| {
                annotations_at(
                    annotations,
                    AnnotationLevel::ManifestDescriptor,
                    &crate::oci::image::platform_of(i),
                )
            })
            .collect();
        let index = annotations_at(annotations, AnnotationLevel::Index, "");
        Built::Index(
            crate::oci::image::commit_index_annotated(&store.blobs, &images, &index, &descriptors)
                .map_err(|e| CliError::msg(e.to_string()))?,
        )
    };
    if let Some(x) = &attested {
        store.set_attested(&plain.digest(), &x.digest)?;
    }
    let built = match &attested {
        Some(x) if attest.layout == AttestLayout::Index => Built::Index(x.clone()),
        _ => plain,
    };
    Ok(Committed {
        built,
        attested,
        steps,
        timings,
    })
}

/// What [`commit`] made.
struct Committed {
    /// What names and outputs get.
    built: Built,
    /// The index with the attestations, when there are any.
    attested: Option<StoredIndex>,
    /// Every step's cache record (what `--cache-to` exports).
    steps: Vec<solver::StepRecord>,
    /// Each platform's steps, with their results and times.
    timings: Vec<summary::Platform>,
}

/// The caches `--cache-from` names; one that cannot be had is a warning (every step runs).
fn import_caches(
    locations: &[Location],
    registry: &Arc<Client>,
    store: &Store,
    reporter: &dyn Reporter,
) -> Vec<Arc<RemoteCache>> {
    let mut imported = Vec::new();
    for loc in locations {
        match RemoteCache::load(loc, registry.clone(), store) {
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
    imported
}

/// `--metadata-file`: the digests, names and layers of what the build made.
fn write_metadata(
    path: &std::path::Path,
    digest: &str,
    built: &Built,
    tags: &[String],
    attested: Option<&StoredIndex>,
    timings: &[summary::Platform],
) -> Result<(), CliError> {
    let mut v = match built {
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
    if let Some(x) = attested {
        // The index a push sends: the images with their attestations.
        v["attestations.index.digest"] = serde_json::json!(x.digest.to_string());
    }
    v["builder.steps"] = summary::steps_json(timings);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap_or_default())
        .map_err(|e| CliError::io(path, e))
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

/// Push the stored image `source` to `dest`.
pub fn push_image(
    store: &Store,
    client: &Client,
    source: &str,
    dest: &Reference,
) -> Result<push::Pushed, CliError> {
    let named = store.resolve(source)?;
    let mut pushed = push::push(client, &store.local(), &named, dest)?;
    // The attestations go along as referrers of their images (those inside a name that is
    // BuildKit's index went with it).
    let inside: Vec<crate::oci::digest::Digest> =
        crate::oci::image::load_attestations(&store.blobs, &named)
            .into_iter()
            .map(|a| a.manifest_digest)
            .collect();
    let mut beside = store.attestations_of(&named);
    beside.retain(|a| !inside.contains(&a.manifest_digest));
    for r in push::push_attestations(client, &store.local(), &beside, dest)? {
        pushed.uploaded += r.uploaded;
        pushed.mounted += r.mounted;
        pushed.present += r.present;
        pushed.referrers += 1;
    }
    Ok(pushed)
}

/// What a push sent, as the user reads it.
pub fn pushed_line(dest: &Reference, p: &push::Pushed) -> String {
    format!(
        "pushed {} ({}): {} blobs uploaded, {} mounted, {} already there; manifest {}{}",
        dest,
        p.digest,
        p.uploaded,
        p.mounted,
        p.present,
        if p.manifest_uploaded {
            "uploaded"
        } else {
            "unchanged"
        },
        match p.referrers {
            0 => String::new(),
            n => format!("; {} attestation manifest(s) as referrers", n),
        }
    )
}
