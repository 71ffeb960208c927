//! What a build read and did, as the solver records it while it runs: the plain data that
//! provenance is made of. Nothing here depends on the cache being warm: a hit records the
//! same inputs, key and layer as the run that filled the cache.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::oci::digest::Digest;

/// One build of one platform.
#[derive(Debug, Clone, Default)]
pub struct BuildTrace {
    /// Every context entry a COPY, ADD or bind mount read, by its path in the context
    /// (`.dockerignore` applied): one listing per read, in the order they were recorded.
    pub context: Vec<ContextListing>,
    /// The same for each `--build-context NAME=DIR` read, by name.
    pub named_contexts: BTreeMap<String, Vec<ContextListing>>,
    /// Base and `--from` images: the reference the build file gives, and the manifest
    /// digest it resolved to.
    pub images: BTreeMap<String, String>,
    /// `ADD` URLs with the digest of what was fetched (or what `--checksum` pinned).
    pub urls: BTreeMap<String, String>,
    /// Layer-producing steps, in the order each stage ran them.
    pub steps: Vec<StepTrace>,
    /// Each stage that ran, by index: its name and what it starts from (`scratch`,
    /// `stage:NAME`, or the image reference).
    pub stages: BTreeMap<usize, (String, String)>,
    /// The stage the image is.
    pub target_stage: usize,
    /// How RUN steps were isolated: `sandbox`, `no-process-sandbox` (the relaxed sandbox)
    /// or `container`.
    pub isolation: String,
}

impl BuildTrace {
    /// The listings of the build's context (`None`), or of the named context `name`.
    pub fn listings_of(&mut self, name: Option<&str>) -> &mut Vec<ContextListing> {
        match name {
            None => &mut self.context,
            Some(n) => self.named_contexts.entry(n.to_string()).or_default(),
        }
    }
}

/// A context entry as the layer will show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextLeaf {
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// A file's content digest (`sha256:…`).
    pub content: Option<String>,
    /// A symlink's target.
    pub link: Option<String>,
    /// The mtime, only when it is older than the build's epoch (a later one is clamped to
    /// the epoch, so it cannot reach the image).
    pub mtime: Option<i64>,
}

impl ContextLeaf {
    /// A leaf as provenance lists it, and its path.
    fn from_json(v: &Value) -> Option<(String, ContextLeaf)> {
        let kind = match v["type"].as_str()? {
            "file" => "file",
            "dir" => "dir",
            "symlink" => "symlink",
            _ => "other",
        };
        let leaf = ContextLeaf {
            kind,
            mode: u32::from_str_radix(v["mode"].as_str()?, 8).ok()?,
            content: v["digest"].as_str().map(str::to_string),
            link: v["link"].as_str().map(str::to_string),
            mtime: v["mtime"].as_i64(),
        };
        Some((v["path"].as_str()?.to_string(), leaf))
    }

    /// The leaf as provenance lists it.
    pub fn to_json(&self, path: &str) -> Value {
        let mut v = json!({"path": path, "type": self.kind, "mode": format!("{:o}", self.mode)});
        if let Some(c) = &self.content {
            v["digest"] = json!(c);
        }
        if let Some(l) = &self.link {
            v["link"] = json!(l);
        }
        if let Some(t) = self.mtime {
            v["mtime"] = json!(t);
        }
        v
    }
}

/// The leaves one context read saw, kept as their canonical JSON ([`leaves_json`], sorted by
/// path): a large context has hundreds of thousands, and a build whose context did not
/// change takes this listing whole from the last build that read it.
#[derive(Debug, Clone)]
pub struct ContextListing {
    pub json: Arc<Vec<u8>>,
    /// sha256 of `json`.
    pub digest: Digest,
    /// The first and last path listed (empty when nothing is).
    pub first: String,
    pub last: String,
}

impl ContextListing {
    pub fn of(leaves: &BTreeMap<String, ContextLeaf>) -> ContextListing {
        let json = leaves_json(leaves.iter());
        let first = leaves.keys().next().cloned().unwrap_or_default();
        let last = leaves.keys().next_back().cloned().unwrap_or_default();
        ContextListing {
            digest: Digest::of(&json),
            json: Arc::new(json),
            first,
            last,
        }
    }

    fn is_empty(&self) -> bool {
        self.json.as_slice() == b"[]"
    }

    /// The leaves back from the JSON (`None` if it is not a listing).
    fn leaves(&self) -> Option<Vec<(String, ContextLeaf)>> {
        let values: Vec<Value> = serde_json::from_slice(&self.json).ok()?;
        values.iter().map(ContextLeaf::from_json).collect()
    }
}

/// The context as the whole build read it: the canonical JSON of every leaf, sorted by path
/// (where two reads list a path, the later's leaf), and its sha256, the context's root.
/// Equal roots mean equal leaves; the leaves say which path differs.
pub fn context_files(listings: &[ContextListing]) -> (Cow<'_, [u8]>, Digest) {
    let mut parts: Vec<&ContextListing> = listings.iter().filter(|l| !l.is_empty()).collect();
    if let [one] = parts.as_slice() {
        return (Cow::Borrowed(one.json.as_slice()), one.digest.clone());
    }
    // Reads of disjoint path ranges (the usual case: different sources) are joined as they
    // are; overlapping ones are merged leaf by leaf.
    let in_order = parts.clone();
    parts.sort_by(|a, b| a.first.cmp(&b.first));
    let disjoint = parts.windows(2).all(|w| w[0].last < w[1].first);
    let json = if disjoint {
        let mut out = Vec::with_capacity(parts.iter().map(|l| l.json.len()).sum::<usize>() + 2);
        out.push(b'[');
        for (i, l) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&l.json[1..l.json.len() - 1]);
        }
        out.push(b']');
        out
    } else {
        let mut merged = BTreeMap::new();
        for l in in_order {
            merged.extend(l.leaves().unwrap_or_default());
        }
        leaves_json(merged.iter())
    };
    let digest = Digest::of(&json);
    (Cow::Owned(json), digest)
}

/// A digest over some of the leaves (what one COPY source covers), hashed as they are
/// written (a large context's list is tens of MB).
pub fn leaves_digest<'a>(leaves: impl Iterator<Item = (&'a String, &'a ContextLeaf)>) -> Digest {
    let mut h = crate::oci::digest::HashingWriter::new(std::io::sink());
    write_leaves(&mut h, leaves);
    h.finish().0
}

/// The canonical JSON (sorted keys, no whitespace) of a list of leaves, the same bytes as
/// `canonical_json` of their [`ContextLeaf::to_json`] values, written directly: a context
/// has as many leaves as files, and this runs on every build.
pub fn leaves_json<'a>(leaves: impl Iterator<Item = (&'a String, &'a ContextLeaf)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    write_leaves(&mut out, leaves);
    out
}

/// [`leaves_json`] into any writer. Writing into memory or a hasher cannot fail, so write
/// errors are not reported.
fn write_leaves<'a>(
    out: &mut impl Write,
    leaves: impl Iterator<Item = (&'a String, &'a ContextLeaf)>,
) {
    let _ = out.write_all(b"[");
    for (i, (path, l)) in leaves.enumerate() {
        if i > 0 {
            let _ = out.write_all(b",");
        }
        write_leaf(out, path, l);
    }
    let _ = out.write_all(b"]");
}

fn write_str(out: &mut impl Write, s: &str) {
    // Most paths and digests need no escaping: those are written as they are (the bytes
    // serde_json writes for them), the rest by serde_json.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        let _ = out.write_all(b"\"");
        let _ = out.write_all(s.as_bytes());
        let _ = out.write_all(b"\"");
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// One leaf, its keys in sorted order: digest, link, mode, mtime, path, type.
fn write_leaf(out: &mut impl Write, path: &str, l: &ContextLeaf) {
    let _ = out.write_all(b"{");
    if let Some(c) = &l.content {
        let _ = out.write_all(b"\"digest\":");
        write_str(out, c);
        let _ = out.write_all(b",");
    }
    if let Some(t) = &l.link {
        let _ = out.write_all(b"\"link\":");
        write_str(out, t);
        let _ = out.write_all(b",");
    }
    let _ = write!(out, "\"mode\":\"{:o}\",", l.mode);
    if let Some(t) = l.mtime {
        let _ = write!(out, "\"mtime\":{},", t);
    }
    let _ = out.write_all(b"\"path\":");
    write_str(out, path);
    let _ = out.write_all(b",\"type\":");
    write_str(out, l.kind);
    let _ = out.write_all(b"}");
}

/// One layer-producing step.
#[derive(Debug, Clone)]
pub struct StepTrace {
    /// The stage's index in the build file, and its name (or index) as `--target` takes it.
    pub stage: usize,
    pub stage_name: String,
    /// 1-based among the stage's instructions (ONBUILD triggers of the base first).
    pub step: usize,
    /// The build file line.
    pub line: usize,
    /// The instruction as written.
    pub op: String,
    /// The step's cache key, which covers its parent's.
    pub key: String,
    /// What the step read: context sources with their digests, stages and images by
    /// identity, URLs, and for RUN the build args in its environment.
    pub inputs: Vec<Value>,
    /// The layer it produced: (digest, diff_id).
    pub layer: Option<(String, String)>,
    /// Whether the cache had it, and how long it took. Not in the provenance (which is a
    /// function of the inputs alone); `--metadata-file` and `--summary` show them.
    pub cached: bool,
    pub seconds: f64,
    /// Why it missed the cache, when it ran and an earlier build was there to compare with.
    pub miss: Option<String>,
}

impl StepTrace {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "stage": self.stage_name,
            "stageIndex": self.stage,
            "step": self.step,
            "line": self.line,
            "op": self.op,
            "cacheKey": self.key,
            "inputs": self.inputs,
        });
        if let Some((digest, diff_id)) = &self.layer {
            v["layer"] = json!({"digest": digest, "diffID": diff_id});
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::image::canonical_json;

    #[test]
    fn leaves_json_is_the_canonical_json_of_the_leaves() {
        let mut leaves = BTreeMap::new();
        leaves.insert(
            "a \"quoted\"\u{7f}\\name".to_string(),
            ContextLeaf {
                kind: "file",
                mode: 0o644,
                content: Some("sha256:00".into()),
                link: None,
                mtime: Some(-5),
            },
        );
        leaves.insert(
            "l".to_string(),
            ContextLeaf {
                kind: "symlink",
                mode: 0o777,
                content: None,
                link: Some("../\u{1}x".into()),
                mtime: None,
            },
        );
        // Written as it is (nothing to escape), DEL and non-ASCII included.
        leaves.insert(
            "src/é plain\u{7f}.txt".to_string(),
            ContextLeaf {
                kind: "file",
                mode: 0o600,
                content: Some("sha256:ff".into()),
                link: None,
                mtime: None,
            },
        );
        let values: Vec<Value> = leaves.iter().map(|(p, l)| l.to_json(p)).collect();
        assert_eq!(
            leaves_json(leaves.iter()),
            canonical_json(&Value::Array(values))
        );
        let back = ContextListing::of(&leaves).leaves().unwrap();
        assert_eq!(back, leaves.into_iter().collect::<Vec<_>>());
    }

    fn listing(paths: &[(&str, &str)]) -> ContextListing {
        let leaves = paths
            .iter()
            .map(|(p, d)| {
                let leaf = ContextLeaf {
                    kind: "file",
                    mode: 0o644,
                    content: Some(d.to_string()),
                    link: None,
                    mtime: None,
                };
                (p.to_string(), leaf)
            })
            .collect();
        ContextListing::of(&leaves)
    }

    #[test]
    fn the_context_files_are_the_listings_merged_the_later_leaf_winning() {
        let a = listing(&[("a/1", "sha256:01"), ("a/2", "sha256:02")]);
        let b = listing(&[("b/1", "sha256:03")]);
        let again = listing(&[("a/2", "sha256:09"), ("c", "sha256:04")]);
        let empty = listing(&[]);
        let want = |paths: &[(&str, &str)]| {
            let l = listing(paths);
            ((*l.json).clone(), l.digest)
        };
        let got = |ls: &[ContextListing]| {
            let (json, digest) = context_files(ls);
            (json.into_owned(), digest)
        };
        assert_eq!(
            got(std::slice::from_ref(&a)),
            want(&[("a/1", "sha256:01"), ("a/2", "sha256:02")])
        );
        // Disjoint reads, in any order, join.
        assert_eq!(
            got(&[b.clone(), empty.clone(), a.clone()]),
            want(&[
                ("a/1", "sha256:01"),
                ("a/2", "sha256:02"),
                ("b/1", "sha256:03")
            ])
        );
        // Overlapping ones merge, the later read's leaf winning.
        assert_eq!(
            got(&[a.clone(), b.clone(), again.clone()]),
            want(&[
                ("a/1", "sha256:01"),
                ("a/2", "sha256:09"),
                ("b/1", "sha256:03"),
                ("c", "sha256:04")
            ])
        );
        assert_eq!(got(&[]), want(&[]));
        assert_eq!(got(&[empty]), want(&[]));
    }
}
