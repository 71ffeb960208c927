//! What a step's key is made of, typed. Each runner's cache map lists the [`StepInput`]s an
//! op reads; that one list is projected twice: into the key (digests and keys, nothing a
//! rename changes) and into the provenance record (names and digests, per source). The
//! stage's first key and the config ops between layers are typed too.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::cache::CacheKey;
use crate::plan::ConfigEdit;

/// The entries of one context read, by path, each with what a layer would show of it.
pub type Fingerprints = std::sync::Arc<BTreeMap<String, String>>;

/// One thing a step reads besides its own op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepInput {
    /// Context files a COPY or a bind mount reads: each source with the digest of what it
    /// names, and the digest of all of them together (what the key takes).
    Context {
        sources: Vec<(String, String)>,
        digest: String,
        mount: Option<usize>,
        /// Each entry read, by path, with what the layer would show of it, when the read
        /// hashed them (not when an unchanged read took its last listing): what a cache
        /// miss's reason names.
        files: Option<Fingerprints>,
    },
    /// An earlier stage, by the key of its last step.
    Stage {
        name: String,
        key: String,
        mount: Option<usize>,
    },
    /// An image, by its manifest digest.
    Image {
        reference: String,
        digest: String,
        mount: Option<usize>,
    },
    /// A URL an ADD fetched (with `--checksum`, known before; otherwise after the fetch).
    Url { url: String, digest: String },
    /// A git source, by the commit its ref resolved to.
    Git { url: String, commit: String },
    /// The build args in a RUN's environment (provenance names them; the op's key has them).
    Args(BTreeMap<String, String>),
    /// Remote content unknown until fetched: a nonce, so that the step is never reused.
    Uncacheable(String),
}

/// An input as the key takes it.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum KeyPart<'a> {
    Context {
        digest: &'a str,
        mount: Option<usize>,
    },
    Stage {
        key: &'a str,
        mount: Option<usize>,
    },
    Image {
        digest: &'a str,
        mount: Option<usize>,
    },
    Uncacheable {
        nonce: &'a str,
    },
    Git {
        commit: &'a str,
    },
}

impl StepInput {
    fn key_part(&self) -> Option<KeyPart<'_>> {
        match self {
            StepInput::Context { digest, mount, .. } => Some(KeyPart::Context {
                digest,
                mount: *mount,
            }),
            StepInput::Stage { key, mount, .. } => Some(KeyPart::Stage { key, mount: *mount }),
            StepInput::Image { digest, mount, .. } => Some(KeyPart::Image {
                digest,
                mount: *mount,
            }),
            StepInput::Uncacheable(nonce) => Some(KeyPart::Uncacheable { nonce }),
            StepInput::Git { commit, .. } => Some(KeyPart::Git { commit }),
            // A URL's content is pinned by the op's checksum, or the step is uncacheable;
            // the args are in the op.
            StepInput::Url { .. } | StepInput::Args(_) => None,
        }
    }

    /// The input as the step's provenance record lists it.
    pub fn records(&self) -> Vec<Value> {
        match self {
            StepInput::Context { sources, .. } => sources
                .iter()
                .map(|(src, d)| json!({"context": src, "digest": d}))
                .collect(),
            StepInput::Stage { name, key, .. } => vec![json!({"stage": name, "key": key})],
            StepInput::Image {
                reference, digest, ..
            } => vec![json!({"image": reference, "digest": digest})],
            StepInput::Url { url, digest } => vec![json!({"url": url, "digest": digest})],
            StepInput::Git { url, commit } => vec![json!({"git": url, "commit": commit})],
            StepInput::Args(args) => vec![json!({ "args": args })],
            StepInput::Uncacheable(_) => Vec::new(),
        }
    }
}

/// The provenance records of a step's inputs, in order.
pub fn records(inputs: &[StepInput]) -> Vec<Value> {
    inputs.iter().flat_map(StepInput::records).collect()
}

/// What a stage's first key is made of, besides its base: everything that shapes layer
/// bytes and timestamps.
#[derive(Serialize)]
pub struct StageKey<'a> {
    pub ops: u32,
    pub epoch: i64,
    pub compression: String,
    /// An arm64 step never hits an amd64 entry, whatever the base.
    pub platform: String,
    pub base_edits: &'a [ConfigEdit],
}

/// A layered step's key material: its op's key, and what it read.
#[derive(Serialize)]
struct StepKey<'a> {
    op: String,
    inputs: Vec<KeyPart<'a>>,
}

/// The config-only ops met since the last layered step (their edits are typed, so their
/// keys say all they did).
#[derive(Serialize)]
struct ConfigOps {
    config_ops: Vec<String>,
}

fn value_of(material: &impl Serialize) -> Value {
    // These types hold strings, numbers and lists only: they always serialize.
    serde_json::to_value(material).unwrap_or(Value::Null)
}

/// The key of a stage's first step, on top of its base's.
pub fn stage_key(base: &CacheKey, material: &StageKey) -> CacheKey {
    CacheKey::chain(base, value_of(material))
}

/// The key of a layered step whose op key is `op` and that read `inputs`.
pub fn step_key(parent: &CacheKey, op: String, inputs: &[StepInput]) -> CacheKey {
    let material = StepKey {
        op,
        inputs: inputs.iter().filter_map(StepInput::key_part).collect(),
    };
    CacheKey::chain(parent, value_of(&material))
}

/// Chain the config-only ops met since the last key into `key`; nothing when there were
/// none.
pub fn key_config_ops(key: CacheKey, pending: &mut Vec<String>) -> CacheKey {
    if pending.is_empty() {
        return key;
    }
    let material = ConfigOps {
        config_ops: std::mem::take(pending),
    };
    CacheKey::chain(&key, value_of(&material))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(digest: &str, name: &str) -> StepInput {
        StepInput::Context {
            sources: vec![(name.into(), format!("{digest}-{name}"))],
            digest: digest.into(),
            mount: None,
            files: None,
        }
    }

    #[test]
    fn the_key_takes_content_and_provenance_takes_names() {
        let base = CacheKey::base(json!("scratch"));
        let a = step_key(&base, "op".into(), &[context("d1", "src")]);
        // Another name for the same content: the same key, another record.
        let renamed = [context("d1", "renamed")];
        assert_eq!(step_key(&base, "op".into(), &renamed), a);
        assert_eq!(records(&renamed)[0]["context"], "renamed");
        // Other content, or the same content mounted at another place: another key.
        assert_ne!(step_key(&base, "op".into(), &[context("d2", "src")]), a);
        let mounted = StepInput::Context {
            sources: vec![],
            digest: "d1".into(),
            mount: Some(0),
            files: None,
        };
        assert_ne!(step_key(&base, "op".into(), &[mounted]), a);
        // Provenance-only inputs leave the key alone.
        let url = StepInput::Url {
            url: "https://example.com/x".into(),
            digest: "sha256:00".into(),
        };
        assert_eq!(
            step_key(&base, "op".into(), &[context("d1", "src"), url.clone()]),
            a
        );
        assert_eq!(records(&[url])[0]["url"], "https://example.com/x");
        // An uncacheable input never repeats.
        let once = step_key(&base, "op".into(), &[StepInput::Uncacheable("1".into())]);
        let twice = step_key(&base, "op".into(), &[StepInput::Uncacheable("2".into())]);
        assert_ne!(once, twice);
    }

    #[test]
    fn config_ops_chain_only_when_there_were_some() {
        let base = CacheKey::base(json!("scratch"));
        assert_eq!(key_config_ops(base.clone(), &mut Vec::new()), base);
        let mut pending = vec!["edit".to_string()];
        assert_ne!(key_config_ops(base.clone(), &mut pending), base);
        assert!(pending.is_empty());
    }
}
