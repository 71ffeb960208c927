//! SLSA provenance v1 as an in-toto Statement v1 about one image manifest. It records what
//! the build was made of and nothing else: the build file (path in the context and digest),
//! the context as the build read it (a root digest over its leaves, and the leaves), the
//! build args, target and platforms, every image by digest, every `ADD` URL with its
//! digest, and builder's version. With `mode=max` it adds one record per layer-producing
//! step: its instruction, cache key, inputs and layer. The epoch is the only time in it.
//!
//! Every field sits where the SLSA v1 protobuf schema puts it (`buildDefinition`,
//! `runDetails`), so strict parsers accept it; the build's own detail lives in the
//! free-form `externalParameters` and `internalParameters`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::trace::BuildTrace;
use crate::oci::digest::Digest;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What kind of build this describes; the parameters' meaning is documented in README.md.
pub const BUILD_TYPE: &str = "urn:builder:build-type:buildfile:v1";
pub const BUILDER_ID: &str = "urn:builder:builder";

/// How much provenance records (`--provenance mode=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inputs only.
    Min,
    /// Inputs and one record per step.
    Max,
}

/// The build's parameters, the same for every platform it builds.
pub struct Invocation<'a> {
    /// The build file's path relative to the context (its name when it lies outside).
    pub build_file: &'a str,
    pub build_file_digest: Digest,
    pub build_args: &'a BTreeMap<String, String>,
    pub target: Option<&'a str>,
    /// The platforms the statement is of (each platform's statement names its own).
    pub platforms: Vec<String>,
    pub epoch: i64,
    pub mode: Mode,
    /// The settings that shape the image beyond the build file and args, each only when it
    /// is not the default (so a plain build's statement names none): `labels`, `addHosts`,
    /// `network`, `compression`, `forceCompression`, `buildContexts` (each name with the
    /// image it stood for, or `local`), `ulimits`, `shmSize`, `squash`. `builder verify` rebuilds with them.
    pub options: serde_json::Map<String, Value>,
}

/// The keys [`Invocation::options`] may hold.
pub const OPTION_KEYS: [&str; 10] = [
    "squash",
    "annotations",
    "ulimits",
    "shmSize",
    "buildContexts",
    "labels",
    "addHosts",
    "network",
    "compression",
    "forceCompression",
];

fn digest_set(d: &str) -> Value {
    match d.split_once(':') {
        Some((alg, hex)) => json!({ alg: hex }),
        None => json!({ "sha256": d }),
    }
}

/// The purl of an image reference for a platform, as BuildKit names materials.
fn image_purl(reference: &str, platform: &str) -> String {
    let encoded: String = platform.replace('/', "%2F");
    format!("pkg:docker/{}?platform={}", reference, encoded)
}

/// Stands for the list of context files in the statement until its bytes are spliced in
/// (a string no build input can hold: it has NUL characters).
const FILES_PLACEHOLDER: &str = "\u{0}files\u{0}";

/// The provenance statement for the `platform` image `manifest` of a build, in canonical
/// JSON.
pub fn statement_bytes(
    inv: &Invocation,
    platform: &str,
    manifest: &Digest,
    trace: &BuildTrace,
) -> Vec<u8> {
    let (doc, files) = statement_parts(inv, platform, manifest, trace);
    splice_files(&doc, &files)
}

/// The statement as canonical JSON with a placeholder where the context's files go, and
/// those files' JSON. The first holds the files' digest, so it alone says what the whole
/// statement is: a build whose context did not change need not write the files again.
pub fn statement_parts<'t>(
    inv: &Invocation,
    platform: &str,
    manifest: &Digest,
    trace: &'t BuildTrace,
) -> (Vec<u8>, std::borrow::Cow<'t, [u8]>) {
    let (files, root) = super::trace::context_files(&trace.context);
    let doc =
        crate::oci::image::canonical_json(&statement_with(inv, platform, manifest, trace, &root));
    (doc, files)
}

/// The whole statement from [`statement_parts`]. The context's leaves (as many as its
/// files) are written straight as canonical JSON, where the placeholder string sits.
pub fn splice_files(doc: &[u8], files: &[u8]) -> Vec<u8> {
    let marker = crate::oci::image::canonical_json(&json!(FILES_PLACEHOLDER));
    match doc
        .windows(marker.len())
        .position(|w| w == marker.as_slice())
    {
        Some(at) => {
            let mut out = Vec::with_capacity(doc.len() + files.len());
            out.extend_from_slice(&doc[..at]);
            out.extend_from_slice(files);
            out.extend_from_slice(&doc[at + marker.len()..]);
            out
        }
        None => doc.to_vec(),
    }
}

/// The provenance statement for the `platform` image `manifest` of a build.
pub fn statement(inv: &Invocation, platform: &str, manifest: &Digest, trace: &BuildTrace) -> Value {
    serde_json::from_slice(&statement_bytes(inv, platform, manifest, trace)).unwrap_or_default()
}

fn statement_with(
    inv: &Invocation,
    platform: &str,
    manifest: &Digest,
    trace: &BuildTrace,
    context_root: &Digest,
) -> Value {
    let mut deps = vec![json!({
        "name": "context",
        "uri": "context",
        "digest": digest_set(&context_root.to_string()),
        "annotations": {"files": FILES_PLACEHOLDER},
    })];
    // Named local contexts, each as the build's own: its root digest and the files read.
    for (name, listings) in &trace.named_contexts {
        let (files, root) = super::trace::context_files(listings);
        let files: Value = serde_json::from_slice(&files).unwrap_or_default();
        deps.push(json!({
            "name": format!("context:{}", name),
            "uri": format!("context:{}", name),
            "digest": digest_set(&root.to_string()),
            "annotations": {"files": files},
        }));
    }
    for (reference, digest) in &trace.images {
        deps.push(json!({
            "name": reference,
            "uri": image_purl(reference, platform),
            "digest": digest_set(digest),
        }));
    }
    for (url, digest) in &trace.urls {
        deps.push(json!({"uri": url, "digest": digest_set(digest)}));
    }
    let mut external = json!({
        "buildFile": {
            "path": inv.build_file,
            "digest": inv.build_file_digest.to_string(),
        },
        "args": inv.build_args,
        "platform": platform,
        "platforms": inv.platforms,
    });
    if let Some(t) = inv.target {
        external["target"] = json!(t);
    }
    for (k, v) in &inv.options {
        external[k.as_str()] = v.clone();
    }
    let mut internal = json!({
        "sourceDateEpoch": inv.epoch,
        "mode": match inv.mode { Mode::Min => "min", Mode::Max => "max" },
    });
    if !trace.isolation.is_empty() {
        internal["isolation"] = json!(trace.isolation);
    }
    if inv.mode == Mode::Max {
        internal["stages"] = json!(trace
            .stages
            .iter()
            .map(|(i, (name, base))| json!({"index": i, "name": name, "base": base}))
            .collect::<Vec<_>>());
        internal["targetStage"] = json!(trace.target_stage);
        internal["steps"] = json!(trace.steps.iter().map(|s| s.to_json()).collect::<Vec<_>>());
    }
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": platform, "digest": digest_set(&manifest.to_string())}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID,
                    "version": {"builder": env!("CARGO_PKG_VERSION")},
                },
            },
        },
    })
}

/// The parts of a provenance statement that `diff` compares, read back.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub build_file: String,
    pub build_file_digest: String,
    pub args: BTreeMap<String, String>,
    pub platform: String,
    pub target: Option<String>,
    /// Images by reference -> digest.
    pub images: BTreeMap<String, String>,
    pub urls: BTreeMap<String, String>,
    pub context_root: String,
    /// Context leaves by path -> the leaf as recorded.
    pub files: BTreeMap<String, Value>,
    /// The step records (`mode=max`), in build-file order.
    pub steps: Vec<Value>,
    /// Stage index -> what it starts from, and its name (`mode=max`).
    pub stage_bases: BTreeMap<u64, String>,
    pub stage_names: BTreeMap<u64, String>,
    /// The stage the image is (`mode=max`).
    pub target_stage: Option<u64>,
    /// The platforms of the whole build.
    pub platforms: Vec<String>,
    /// `sourceDateEpoch`.
    pub epoch: Option<i64>,
    /// `min` or `max`.
    pub mode: String,
    /// The non-default settings (see [`Invocation::options`]).
    pub options: BTreeMap<String, Value>,
    /// Which isolation RUN had, when weaker than the sandbox.
    pub isolation: Option<String>,
    /// The image manifest the statement is about.
    pub subject: String,
}

/// Read a provenance statement back; `None` when it is not one of ours.
pub fn read(statement: &Value) -> Option<Recorded> {
    if statement["predicateType"].as_str() != Some(PREDICATE_TYPE) {
        return None;
    }
    let def = &statement["predicate"]["buildDefinition"];
    let ext = &def["externalParameters"];
    let mut r = Recorded {
        build_file: ext["buildFile"]["path"].as_str()?.to_string(),
        build_file_digest: ext["buildFile"]["digest"].as_str()?.to_string(),
        platform: ext["platform"].as_str().unwrap_or("").to_string(),
        target: ext["target"].as_str().map(str::to_string),
        ..Recorded::default()
    };
    for k in OPTION_KEYS {
        if let Some(v) = ext.get(k) {
            r.options.insert(k.to_string(), v.clone());
        }
    }
    r.platforms = ext["platforms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    let internal = &def["internalParameters"];
    r.epoch = internal["sourceDateEpoch"].as_i64();
    r.mode = internal["mode"].as_str().unwrap_or("").to_string();
    r.isolation = internal["isolation"].as_str().map(str::to_string);
    r.subject = statement["subject"][0]["digest"]["sha256"]
        .as_str()
        .map(|h| format!("sha256:{}", h))
        .unwrap_or_default();
    if let Some(args) = ext["args"].as_object() {
        for (k, v) in args {
            r.args
                .insert(k.clone(), v.as_str().unwrap_or("").to_string());
        }
    }
    let digest_of = |d: &Value| -> String {
        d["digest"]
            .as_object()
            .and_then(|m| m.iter().next())
            .map(|(alg, hex)| format!("{}:{}", alg, hex.as_str().unwrap_or("")))
            .unwrap_or_default()
    };
    for dep in def["resolvedDependencies"].as_array()? {
        let uri = dep["uri"].as_str().unwrap_or("");
        if uri == "context" {
            r.context_root = digest_of(dep);
            for f in dep["annotations"]["files"].as_array().into_iter().flatten() {
                if let Some(p) = f["path"].as_str() {
                    r.files.insert(p.to_string(), f.clone());
                }
            }
        } else if uri.starts_with("pkg:docker/") {
            let name = dep["name"].as_str().unwrap_or(uri).to_string();
            r.images.insert(name, digest_of(dep));
        } else {
            r.urls.insert(uri.to_string(), digest_of(dep));
        }
    }
    for st in def["internalParameters"]["stages"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let (Some(i), Some(b)) = (st["index"].as_u64(), st["base"].as_str()) {
            r.stage_bases.insert(i, b.to_string());
            r.stage_names
                .insert(i, st["name"].as_str().unwrap_or("").to_string());
        }
    }
    r.target_stage = def["internalParameters"]["targetStage"].as_u64();
    r.steps = def["internalParameters"]["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::trace::{ContextLeaf, ContextListing};

    #[test]
    fn the_spliced_statement_is_canonical_json_of_the_whole() {
        let mut trace = BuildTrace::default();
        let mut leaves = BTreeMap::new();
        for p in ["b", "a/x", "c \"q\""] {
            leaves.insert(
                p.to_string(),
                ContextLeaf {
                    kind: "file",
                    mode: 0o600,
                    content: Some("sha256:ab".into()),
                    link: None,
                    mtime: None,
                },
            );
        }
        trace.context.push(ContextListing::of(&leaves));
        trace.images.insert("busybox".into(), "sha256:cd".into());
        let args = BTreeMap::new();
        let inv = Invocation {
            build_file: "Buildfile",
            build_file_digest: Digest::of(b"FROM busybox"),
            build_args: &args,
            target: None,
            platforms: vec!["linux/amd64".into()],
            epoch: 0,
            mode: Mode::Max,
            options: Default::default(),
        };
        let m = Digest::of(b"manifest");
        let bytes = statement_bytes(&inv, "linux/amd64", &m, &trace);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(crate::oci::image::canonical_json(&v), bytes);
        let files =
            &v["predicate"]["buildDefinition"]["resolvedDependencies"][0]["annotations"]["files"];
        assert_eq!(files.as_array().unwrap().len(), 3);
        assert_eq!(files[0]["path"], "a/x");
        let r = read(&v).unwrap();
        assert_eq!(r.images["busybox"], "sha256:cd");
        assert_eq!(r.files.len(), 3);
    }
}
