//! `builder verify REF [--context DIR]`: rebuild a published image from its provenance, in a
//! fresh store with its bases pinned, and say whether it reproduced (exit 0) or not (exit 1,
//! with why). The rebuild is an ordinary `builder build` whose flags come from the
//! provenance; see `crate::pipeline::rebuild` for what is read and checked.

use std::path::{Component, Path, PathBuf};

use clap::{Args, Parser};
use serde_json::{json, Value};

use super::build::{BuildArgs, ProgressMode};
use super::images::RootArg;
use super::CliError;
use crate::pipeline::{self, rebuild};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The image: a store name, oci:DIR[:TAG], oci-archive:FILE[:TAG] or a registry reference.
    reference: String,
    /// The context to rebuild from (a checkout of the sources).
    #[arg(long, default_value = ".")]
    context: PathBuf,
    /// The build file, when it is not where the provenance says in the context.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// text or json (the verdict on stdout; the rebuild's progress on stderr).
    #[arg(long, default_value = "text")]
    format: String,
    /// The rebuild's progress.
    #[arg(long, value_enum, default_value = "plain")]
    progress: ProgressMode,
    /// Also require a signature of every image by this public key (PEM; repeatable: any
    /// one of them).
    #[arg(long = "key", value_name = "FILE")]
    keys: Vec<PathBuf>,
    #[command(flatten)]
    root: RootArg,
}

/// The build command line a rebuild runs, parsed as `builder build` parses its own.
#[derive(Parser)]
struct RebuildCommand {
    #[command(flatten)]
    build: BuildArgs,
}

pub fn run(a: VerifyArgs) -> Result<(), CliError> {
    let json_out = super::flags::json_format(&a.format)?;
    let store = a.root.open()?;
    let client =
        crate::registry::Client::from_config()?.with_notices(|m| eprintln!("warning: {}", m));
    let context = a
        .context
        .canonicalize()
        .map_err(|e| CliError::io(&a.context, e))?;
    let published = rebuild::read_published(&store, &a.reference, &client)?;
    let mut plan = rebuild::plan_of(&published)?;
    let mut keys = Vec::new();
    for k in &a.keys {
        keys.push((
            k.display().to_string(),
            crate::attest::signing::PublicKey::from_pem_file(k).map_err(CliError::msg)?,
        ));
    }
    let mut signatures = Vec::new();
    if !keys.is_empty() {
        for p in &published.images {
            match pipeline::policy::signed_by_any(&store, &p.image, &keys) {
                Some(k) => signatures.push(json!({"platform": p.platform, "signedBy": k})),
                None => plan.problems.push(format!(
                    "the {} image {} has no signature by {}",
                    p.platform,
                    p.image.manifest_digest,
                    a.keys
                        .iter()
                        .map(|k| k.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
            }
        }
    }
    let check = rebuild::check_context(&published, &plan, &context, a.file.as_deref())?;
    let file = match &a.file {
        Some(f) => f.clone(),
        None => build_file_in(&context, &plan.build_file)?,
    };
    let mut report = json!({
        "reference": a.reference,
        "digest": published.top.to_string(),
        "provenance": {
            "buildFile": {"path": plan.build_file, "digest": plan.build_file_digest},
            "args": plan.args,
            "target": plan.target,
            "platforms": plan.platforms,
            "sourceDateEpoch": plan.epoch,
            "options": plan.options,
        },
        "problems": plan.problems,
        "signatures": signatures,
        "context": {
            "matching": check.matching,
            "differing": check.differing.iter().map(|(p, r, f)| json!({"path": p, "recorded": r, "found": f})).collect::<Vec<_>>(),
        },
    });
    if let Some(d) = &check.build_file {
        report["buildFile"] = json!({"recorded": plan.build_file_digest, "found": d});
    }
    if !json_out {
        print!("{}", header_text(&a.reference, &published, &plan, &check));
        for s in &signatures {
            println!(
                "{}: signed by {}",
                s["platform"].as_str().unwrap_or(""),
                s["signedBy"].as_str().unwrap_or("")
            );
        }
    }

    // A local build context is not in the image or the registry: nothing can bring it back.
    if let Some(local) = plan
        .options
        .get("buildContexts")
        .and_then(Value::as_object)
        .and_then(|m| m.iter().find(|(_, v)| v.as_str() == Some("local")))
    {
        return Err(CliError::msg(format!(
            "the build read the local build context {:?}, which verify cannot bring back; \
             rebuild with --build-context {}=DIR and compare digests",
            local.0, local.0
        )));
    }
    // The rebuild, in a fresh store under the store's scratch (removed when done).
    let scratch = store.scratch_dir("verify-")?;
    let fresh_root = scratch.path().join("store");
    let fresh = Store::open(&fresh_root)?;
    let pinned = rebuild::pin_bases(&store, &fresh, &published, &client)?;
    report["pinned"] = json!(pinned
        .iter()
        .map(|(n, d)| json!({"name": n, "digest": d.to_string()}))
        .collect::<Vec<_>>());
    let argv = rebuild_argv(&plan, &fresh_root, &file, &context, a.progress);
    if !json_out {
        println!(
            "rebuilding in a fresh store: {} base(s) pinned, RUN network {}",
            pinned.len(),
            plan.run_network.as_deref().unwrap_or("none")
        );
    }
    let parsed = RebuildCommand::try_parse_from(&argv)
        .map_err(|e| CliError::msg(format!("the rebuild's flags: {}", e)))?;
    let options = super::build::resolve(parsed.build)?;
    let rebuilt = match pipeline::build(options)? {
        pipeline::Finished::Built(d) => d
            .parse()
            .map_err(|e: crate::oci::digest::BadDigest| CliError::msg(e.to_string()))?,
        pipeline::Finished::Checked(_) => return Err(CliError::msg("the rebuild built nothing")),
    };
    let verdict = rebuild::compare(&published, &store, &fresh, &rebuilt)?;
    let reproduced = verdict["reproduced"].as_bool() == Some(true)
        && plan.problems.is_empty()
        && check.differing.is_empty()
        && check.build_file.is_none();
    report["rebuilt"] = json!(rebuilt.to_string());
    report["platforms"] = verdict["platforms"].clone();
    report["reproduced"] = json!(reproduced);
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", verdict_text(&report));
    }
    if reproduced {
        Ok(())
    } else {
        Err(CliError::exit(1))
    }
}

/// The build file at `path` in the context, a path the provenance gives: relative, with
/// no `..`, and inside the context once its links are followed.
fn build_file_in(context: &Path, path: &str) -> Result<PathBuf, CliError> {
    let rel = Path::new(path);
    if path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(CliError::msg(format!(
            "the provenance names the build file {:?}, which is no path inside a context; give it with -f",
            path
        )));
    }
    let full = context.join(rel);
    let real = full.canonicalize().map_err(|e| CliError::io(&full, e))?;
    if !real.starts_with(context) {
        return Err(CliError::msg(format!(
            "{}: the build file leads outside the context; give it with -f",
            full.display()
        )));
    }
    Ok(real)
}

/// `builder build` flags that redo the build the provenance describes.
fn rebuild_argv(
    plan: &rebuild::RebuildPlan,
    root: &Path,
    file: &Path,
    context: &Path,
    progress: ProgressMode,
) -> Vec<String> {
    let mut v: Vec<String> = vec!["build".into()];
    // As `--key=value`: an optional value (`--pull`) takes nothing that follows it.
    let mut flag = |k: &str, val: String| v.push(format!("{}={}", k, val));
    flag("--root", root.display().to_string());
    flag("--file", file.display().to_string());
    flag("--source-date-epoch", plan.epoch.to_string());
    flag("--platform", plan.platforms.join(","));
    flag("--provenance", format!("mode={}", plan.mode));
    flag("--sbom", "false".into());
    flag("--pull", "never".into());
    flag("--tag", "builder-verify/rebuilt:latest".into());
    flag("--progress", format!("{:?}", progress).to_lowercase());
    for (k, val) in &plan.args {
        flag("--build-arg", format!("{}={}", k, val));
    }
    if let Some(t) = &plan.target {
        flag("--target", t.clone());
    }
    for (k, val) in plan
        .options
        .get("labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        flag("--label", format!("{}={}", k, val.as_str().unwrap_or("")));
    }
    for (name, value) in plan
        .options
        .get("buildContexts")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        flag(
            "--build-context",
            format!("{}={}", name, value.as_str().unwrap_or("")),
        );
    }
    // The options provenance records as lists of flag values.
    if let Some(size) = plan.options.get("shmSize").and_then(Value::as_u64) {
        flag("--shm-size", size.to_string());
    }
    for (key, name) in [
        ("annotations", "--annotation"),
        ("addHosts", "--add-host"),
        ("ulimits", "--ulimit"),
    ] {
        for value in plan
            .options
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            flag(name, value.as_str().unwrap_or("").to_string());
        }
    }
    match plan.run_network.as_deref() {
        None => flag("--network", "none".into()),
        Some("host") => {
            flag("--network", "host".into());
            flag("--allow", "network.host".into());
        }
        Some(_) => {}
    }
    if let Some(c) = plan.options.get("compression").and_then(Value::as_str) {
        let (kind, level) = c.split_once(':').unwrap_or((c, ""));
        flag("--compression", kind.to_string());
        if !level.is_empty() {
            flag("--compression-level", level.to_string());
        }
    }
    if plan
        .options
        .get("forceCompression")
        .and_then(Value::as_bool)
        == Some(true)
    {
        v.push("--force-compression".into());
    }
    if plan.options.get("squash").and_then(Value::as_bool) == Some(true) {
        v.push("--squash".into());
    }
    v.push(context.display().to_string());
    v
}

fn header_text(
    reference: &str,
    published: &rebuild::Published,
    plan: &rebuild::RebuildPlan,
    check: &rebuild::ContextCheck,
) -> String {
    let mut out = format!("verifying {} ({})\n", reference, published.top);
    out.push_str(&format!(
        "provenance: build file {} ({}), platforms {}, sourceDateEpoch {}\n",
        plan.build_file,
        plan.build_file_digest,
        plan.platforms.join(","),
        plan.epoch
    ));
    if let Some(t) = &plan.target {
        out.push_str(&format!("  target {}\n", t));
    }
    for (k, v) in &plan.args {
        out.push_str(&format!("  build arg {}={}\n", k, v));
    }
    for (k, v) in &plan.options {
        out.push_str(&format!("  build option {}: {}\n", k, v));
    }
    for p in &plan.problems {
        out.push_str(&format!("problem: {}\n", p));
    }
    if let Some(d) = &check.build_file {
        out.push_str(&format!(
            "build file {} differs: recorded {}, the context has {}\n",
            plan.build_file, plan.build_file_digest, d
        ));
    }
    if check.differing.is_empty() {
        out.push_str(&format!(
            "context: the {} files the provenance records match\n",
            check.matching
        ));
    } else {
        out.push_str(&format!(
            "context files that differ from the provenance ({} match):\n",
            check.matching
        ));
        for (path, recorded, found) in &check.differing {
            out.push_str(&format!(
                "  {}: recorded {}, the context has {}\n",
                path,
                leaf_text(recorded),
                leaf_text(found)
            ));
        }
    }
    out
}

fn leaf_text(v: &Value) -> String {
    if v.is_null() {
        return "nothing".into();
    }
    let kind = v["type"].as_str().unwrap_or("?");
    match (v["digest"].as_str(), v["link"].as_str()) {
        (Some(d), _) => format!("{} {} mode {}", kind, d, v["mode"].as_str().unwrap_or("")),
        (_, Some(l)) => format!("{} -> {}", kind, l),
        _ => format!("{} mode {}", kind, v["mode"].as_str().unwrap_or("")),
    }
}

fn verdict_text(report: &Value) -> String {
    let mut out = String::new();
    for p in report["platforms"].as_array().into_iter().flatten() {
        let platform = p["platform"].as_str().unwrap_or("");
        if let Some(fields) = p["provenanceDiffers"].as_array() {
            let names: Vec<&str> = fields.iter().filter_map(|f| f.as_str()).collect();
            out.push_str(&format!(
                "{}: the published provenance differs from what the rebuild records: {}\n",
                platform,
                names.join(", ")
            ));
        }
        if p["reproduced"].as_bool() == Some(true) {
            out.push_str(&format!(
                "{}: reproduced {}\n",
                platform,
                p["published"].as_str().unwrap_or("")
            ));
            continue;
        }
        if p["published"] == p["rebuilt"] {
            continue;
        }
        out.push_str(&format!(
            "{}: NOT reproduced: published {}, rebuilt {}\n",
            platform,
            p["published"].as_str().unwrap_or(""),
            p["rebuilt"].as_str().unwrap_or("nothing")
        ));
        if let Some(x) = p.get("explanation") {
            out.push_str(&crate::attest::explain::render(x));
        }
        if let Some(d) = p.get("diff") {
            out.push_str(&crate::oci::diff::render(d));
        }
    }
    out.push_str(if report["reproduced"].as_bool() == Some(true) {
        "verified: the image reproduces from its provenance and this context\n"
    } else {
        "not verified\n"
    });
    out
}
