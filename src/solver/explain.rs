//! Why a step missed the cache. Each build keeps a record of its steps (their op keys,
//! parents and typed inputs, and the context entries they read), one per build file, target,
//! context and platform. The next build of the same compares a step that runs with the same
//! step of that record, and says what differs: a context file, a build arg, the base image,
//! the instruction, or the step before it. The record is made from the same [`StepInput`]s as
//! the key, so a reason never disagrees with what actually missed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inputs::{Fingerprints, StepInput};
use super::BuildRequest;
use crate::attest::trace::{ContextLeaf, StepTrace};
use crate::oci::digest::Digest;
use crate::store::{image_build_record, Bucket, Store};

/// What a build's steps were, for the next build to compare with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Each stage's base (its reference and digest, `scratch` or a stage), by stage index.
    pub bases: BTreeMap<usize, String>,
    pub steps: Vec<RecordedStep>,
}

/// One layered step of a build.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordedStep {
    pub stage: usize,
    pub step: usize,
    /// The instruction as written.
    pub text: String,
    pub op_key: String,
    pub key: String,
    pub parent: String,
    /// The build args in a RUN's environment.
    pub args: BTreeMap<String, String>,
    /// Context reads: their digest and, when hashed, each entry's fingerprint.
    pub context: Vec<(String, Option<Fingerprints>)>,
    /// Stages read, by name, with their key; images, by reference, with their digest.
    pub stages: Vec<(String, String)>,
    pub images: Vec<(String, String)>,
}

impl RecordedStep {
    pub fn new(
        at: (usize, usize),
        text: &str,
        op_key: String,
        parent: &str,
        key: &str,
        inputs: &[StepInput],
    ) -> RecordedStep {
        let mut r = RecordedStep {
            stage: at.0,
            step: at.1,
            text: text.to_string(),
            op_key,
            key: key.to_string(),
            parent: parent.to_string(),
            ..RecordedStep::default()
        };
        for i in inputs {
            match i {
                StepInput::Context { digest, files, .. } => {
                    r.context.push((digest.clone(), files.clone()))
                }
                StepInput::Stage { name, key, .. } => r.stages.push((name.clone(), key.clone())),
                StepInput::Image {
                    reference, digest, ..
                } => r.images.push((reference.clone(), digest.clone())),
                StepInput::Args(a) => r.args = a.clone(),
                StepInput::Url { .. } | StepInput::Uncacheable(_) | StepInput::Git { .. } => {}
            }
        }
        r
    }
}

/// What a context entry shows a layer: kind, mode, content, link target, old mtime.
pub fn fingerprint(leaf: &ContextLeaf) -> String {
    format!(
        "{} {:o} {} {} {}",
        leaf.kind,
        leaf.mode,
        leaf.content.as_deref().unwrap_or("-"),
        leaf.link.as_deref().unwrap_or("-"),
        leaf.mtime.map(|m| m.to_string()).unwrap_or_default()
    )
}

/// What `builder debug cache` shows of one step of the build that made an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub stage: String,
    pub step: usize,
    pub line: usize,
    pub instruction: String,
    pub key: String,
    pub cached: bool,
    pub seconds: f64,
    pub miss: Option<String>,
}

fn image_steps_key(manifest: &Digest) -> String {
    format!("{}.steps", image_build_record(manifest))
}

/// Keep the build record `record` (as [`record_key`] names it) and its steps' results as
/// the record of the image `manifest`, for `--explain-against` and `builder debug cache`.
pub fn keep_for_image(store: &Store, record: &str, manifest: &Digest, steps: &[StepTrace]) {
    let memo = store.memo(Bucket::Builds);
    // A build that ran nothing made an image some build already recorded: that record (of
    // the build that ran its steps) stays, and a no-op writes nothing.
    if steps.iter().all(|s| s.cached) && memo.has(&image_steps_key(manifest)) {
        return;
    }
    memo.link(record, &image_build_record(manifest));
    let results: Vec<StepResult> = steps
        .iter()
        .map(|s| StepResult {
            stage: s.stage_name.clone(),
            step: s.step,
            line: s.line,
            instruction: s.op.clone(),
            key: s.key.clone(),
            cached: s.cached,
            seconds: s.seconds,
            miss: s.miss.clone(),
        })
        .collect();
    if let Ok(bytes) = serde_json::to_vec(&results) {
        memo.put(&image_steps_key(manifest), &bytes);
    }
}

/// The record of the build that made the image `manifest`.
pub fn load_for_image(store: &Store, manifest: &Digest) -> Option<BuildRecord> {
    let bytes = store
        .memo(Bucket::Builds)
        .get(&image_build_record(manifest))?;
    serde_json::from_slice(&bytes).ok()
}

/// The steps of the build that made the image `manifest`, with their results.
pub fn steps_of_image(store: &Store, manifest: &Digest) -> Option<Vec<StepResult>> {
    let bytes = store.memo(Bucket::Builds).get(&image_steps_key(manifest))?;
    serde_json::from_slice(&bytes).ok()
}

/// The record's name: the build file, context, target and platform it is of.
pub fn record_key(req: &BuildRequest) -> String {
    let identity = format!(
        "{}\0{}\0{}\0{}",
        req.context.display(),
        req.file_name,
        req.graph.target,
        req.platform.spec()
    );
    Digest::of(identity.as_bytes()).hex().to_string()
}

/// Whether a build of this build file, target, context and platform left a record.
pub fn exists(store: &Store, req: &BuildRequest) -> bool {
    store.memo(Bucket::Builds).has(&record_key(req))
}

/// The record a step that misses is compared with: that of the build that made
/// `--explain-against`'s image, else the one the last build of this build file, target,
/// context and platform left.
pub fn load(store: &Store, req: &BuildRequest) -> Option<BuildRecord> {
    if let Some(image) = &req.explain_against {
        return load_for_image(store, image);
    }
    read_record(&store.memo(Bucket::Builds), &record_key(req))
}

fn read_record(builds: &crate::store::Memo, key: &str) -> Option<BuildRecord> {
    serde_json::from_slice(&builds.get(key)?).ok()
}

/// [`load`] on a thread of its own (the record of a big context takes milliseconds to
/// parse), for a build that is about to miss; `None` with `--explain-against`.
pub fn load_ahead(
    store: &Store,
    req: &BuildRequest,
) -> Option<std::thread::JoinHandle<Option<BuildRecord>>> {
    if req.explain_against.is_some() {
        return None;
    }
    let (memo, key) = (store.memo(Bucket::Builds), record_key(req));
    Some(std::thread::spawn(move || read_record(&memo, &key)))
}

/// Keep `record` for the next build; context entries it did not hash (an unchanged read)
/// are taken from `previous`, where the digest is the same.
pub fn save(
    store: &Store,
    req: &BuildRequest,
    mut record: BuildRecord,
    previous: Option<&BuildRecord>,
) {
    if let Some(prev) = previous {
        for step in &mut record.steps {
            let Some(p) = prev
                .steps
                .iter()
                .find(|p| (p.stage, p.step) == (step.stage, step.step))
            else {
                continue;
            };
            for (i, (digest, files)) in step.context.iter_mut().enumerate() {
                if files.is_none() {
                    if let Some((d, f)) = p.context.get(i) {
                        if d == digest {
                            *files = f.clone();
                        }
                    }
                }
            }
        }
    }
    record.steps.sort_by_key(|s| (s.stage, s.step));
    if let Ok(bytes) = serde_json::to_vec(&record) {
        store.memo(Bucket::Builds).put(&record_key(req), &bytes);
    }
}

/// Why `now` ran, against the same step of the last build (`None`: it had no such step).
/// `base` says how the stage's base changed, if it did; `first` whether this is the stage's
/// first layered step.
pub fn reason(
    before: Option<&RecordedStep>,
    now: &RecordedStep,
    base: Option<&str>,
    first: bool,
) -> String {
    let Some(b) = before else {
        return "a new step".to_string();
    };
    let mut why = Vec::new();
    for (k, v) in &now.args {
        match b.args.get(k) {
            Some(old) if old != v => {
                why.push(format!("build arg {} changed ({} -> {})", k, old, v))
            }
            None => why.push(format!("build arg {} set ({})", k, v)),
            _ => {}
        }
    }
    for k in b.args.keys().filter(|k| !now.args.contains_key(*k)) {
        why.push(format!("build arg {} unset", k));
    }
    if why.is_empty() && now.op_key != b.op_key {
        why.push(if now.text != b.text {
            "instruction text changed".to_string()
        } else {
            "what the instruction resolves to changed (an ARG, ENV, USER or WORKDIR before it)"
                .to_string()
        });
    }
    for (i, (digest, files)) in now.context.iter().enumerate() {
        let Some((old_digest, old_files)) = b.context.get(i) else {
            continue;
        };
        if digest == old_digest {
            continue;
        }
        match (files, old_files) {
            (Some(new), Some(old)) => why.push(changed_files(old, new)),
            _ => why.push("context files changed".to_string()),
        }
    }
    for (name, key) in &now.stages {
        if b.stages.iter().any(|(n, k)| n == name && k != key) {
            why.push(format!("stage {} changed", name));
        }
    }
    for (reference, digest) in &now.images {
        if b.images.iter().any(|(r, d)| r == reference && d != digest) {
            why.push(format!("image {} now {}", reference, digest));
        }
    }
    if why.is_empty() && now.parent != b.parent {
        why.push(match (first, base) {
            (true, Some(base)) => format!("FROM: {}", base),
            (true, None) => "an instruction before it changed".to_string(),
            _ => "the step before it changed".to_string(),
        });
    }
    if why.is_empty() {
        why.push("not in the cache (pruned, or built with --no-cache)".to_string());
    }
    why.join("; ")
}

/// The entries that differ between two reads: the first few by name, then how many more.
fn changed_files(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> String {
    let mut names = Vec::new();
    for (path, f) in new {
        match old.get(path) {
            Some(o) if o == f => {}
            Some(_) => names.push(format!("{} changed", path)),
            None => names.push(format!("{} added", path)),
        }
    }
    for path in old.keys().filter(|p| !new.contains_key(*p)) {
        names.push(format!("{} removed", path));
    }
    // A directory's own entry changes with what is in it: name files first.
    names.sort_by_key(|n| {
        let path = n.rsplit_once(' ').map_or(n.as_str(), |(p, _)| p);
        new.get(path)
            .or_else(|| old.get(path))
            .is_some_and(|f| f.starts_with("dir "))
    });
    match names.len() {
        0 => "context files changed".to_string(),
        n if n <= 3 => names.join(", "),
        n => format!("{} and {} more", names[..3].join(", "), n - 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(text: &str, parent: &str) -> RecordedStep {
        RecordedStep {
            text: text.into(),
            op_key: format!("op:{text}"),
            parent: parent.into(),
            ..RecordedStep::default()
        }
    }

    #[test]
    fn reasons_name_what_differs() {
        let before = step("RUN make", "p1");
        // A build arg.
        let mut now = before.clone();
        now.args.insert("FLAVOR".into(), "spicy".into());
        let mut b = before.clone();
        b.args.insert("FLAVOR".into(), "plain".into());
        now.op_key = "other".into();
        assert_eq!(
            reason(Some(&b), &now, None, false),
            "build arg FLAVOR changed (plain -> spicy)"
        );
        // The text.
        let now = step("RUN make all", "p1");
        assert_eq!(
            reason(Some(&before), &now, None, false),
            "instruction text changed"
        );
        // The parent, and the base.
        let now = step("RUN make", "p2");
        assert_eq!(
            reason(Some(&before), &now, None, false),
            "the step before it changed"
        );
        assert_eq!(
            reason(
                Some(&before),
                &now,
                Some("base image a:1 now sha256:9"),
                true
            ),
            "FROM: base image a:1 now sha256:9"
        );
        // Nothing.
        assert!(reason(Some(&before), &before, None, false).starts_with("not in the cache"));
        assert_eq!(reason(None, &before, None, false), "a new step");
    }

    #[test]
    fn changed_files_are_named_files_first() {
        let old: BTreeMap<String, String> = [
            ("src".into(), "dir 755".into()),
            ("src/a".into(), "file 1".into()),
            ("src/b".into(), "file 2".into()),
        ]
        .into();
        let mut new = old.clone();
        new.insert("src".into(), "dir 755 x".into());
        new.insert("src/b".into(), "file 3".into());
        new.insert("src/c".into(), "file 4".into());
        new.remove("src/a");
        assert_eq!(
            changed_files(&old, &new),
            "src/b changed, src/c added, src/a removed and 1 more"
        );
    }
}
