//! The layer cache. A step's key is the sha256 of a canonical JSON document (sorted keys, no
//! whitespace; never Rust's `Hash`) holding its parent's key and everything that changes the
//! step's result: the op's own key (`plan::Op::cache_key`) and what its inputs hold now (the
//! content digest of exactly the context files it reads, the keys of the stages and the
//! digests of the images it reads). An entry maps a key to the image state after the
//! step (config blob + layers) and is written, atomically, only after its blobs are durable.
//! Beside it, [`chunks`] keeps the compressed chunks a rewritten layer can reuse.

pub mod chunks;
pub mod context_hash;
pub mod gc;
pub mod mounts;
pub mod remote;
pub mod segments;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::oci::blobs::{write_atomic, BlobStore};
use crate::oci::digest::Digest;
use crate::oci::image::{canonical_json, state_from_config, ImageState, LayerRef};

/// Drop `v` on a thread of its own: a large context's entries (and its stat cache) are
/// hundreds of thousands of allocations, and freeing them one by one need not hold up the
/// build.
pub fn free_aside<T: Send + 'static>(v: T) {
    // Should no thread start, `v` is dropped here.
    let _ = std::thread::Builder::new().spawn(move || drop(v));
}

/// A step's cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey(pub Digest);

/// Bump when the meaning of key material changes, so old entries stop matching.
/// 2: context owners are relative to the context directory's, and SELinux labels are left
/// out, so a key is the same on any machine.
/// 3: gzip layers are written in independent chunks (other bytes than before).
/// 4: steps are keyed by their typed op (`plan::Op::cache_key`) and its inputs, not by
/// instruction text.
/// 5: context paths and link targets are keyed by their bytes (invalid UTF-8 included), not by
/// a lossy string.
/// 6: a step's inputs are typed (`solver::inputs`): each keyed by its kind and, for a RUN
/// mount, its place.
pub(crate) const KEY_VERSION: u32 = 6;

impl CacheKey {
    /// The key of a stage's starting point.
    pub fn base(material: Value) -> CacheKey {
        CacheKey(Digest::of(&canonical_json(
            &json!({"v": KEY_VERSION, "base": material}),
        )))
    }
    /// The key of a step on top of `parent`.
    pub fn chain(parent: &CacheKey, step: Value) -> CacheKey {
        CacheKey(Digest::of(&canonical_json(
            &json!({"v": KEY_VERSION, "parent": parent.0.to_string(), "step": step}),
        )))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Blob(#[from] crate::oci::blobs::BlobError),
}

/// `cache/<key>.json` files under the store.
#[derive(Clone)]
pub struct CacheIndex {
    dir: PathBuf,
    blobs: BlobStore,
    /// Imported caches (`--cache-from`), asked in order when an entry is missing here.
    remotes: Vec<std::sync::Arc<remote::RemoteCache>>,
}

/// One cached step result.
pub struct Hit {
    pub state: ImageState,
}

impl CacheIndex {
    /// The index kept in `dir` (the store's steps bucket).
    pub fn new(dir: &Path, blobs: &BlobStore) -> CacheIndex {
        CacheIndex {
            dir: dir.to_path_buf(),
            blobs: blobs.clone(),
            remotes: Vec::new(),
        }
    }

    /// The same index, falling back to `remotes` on a miss.
    pub fn with_remotes(mut self, remotes: Vec<std::sync::Arc<remote::RemoteCache>>) -> Self {
        self.remotes = remotes;
        self
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.json", key.0.hex()))
    }

    /// The entry for `key` as recorded: config digest and layers (blobs not checked).
    pub fn entry(&self, key: &CacheKey) -> Option<(Digest, Vec<LayerRef>)> {
        let bytes = fs::read(self.path(key)).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        let config: Digest = v["config"].as_str()?.parse().ok()?;
        let layers = v["layers"]
            .as_array()?
            .iter()
            .map(LayerRef::from_json)
            .collect::<Option<Vec<_>>>()?;
        Some((config, layers))
    }

    /// The cached state for `key`, when the entry and every blob it needs are present and
    /// intact. A damaged entry is a miss, never an error. On a local miss, an imported cache
    /// that has the key brings its blobs into the store and the entry becomes local.
    pub fn get(&self, key: &CacheKey) -> Option<Hit> {
        if let Some(hit) = self.get_local(key) {
            return Some(hit);
        }
        for r in &self.remotes {
            if let Some(state) = r.materialize(key, &self.blobs) {
                if self.put(key, &state).is_ok() {
                    return self.get_local(key);
                }
                return Some(Hit { state });
            }
        }
        None
    }

    fn get_local(&self, key: &CacheKey) -> Option<Hit> {
        let (config, layers) = self.entry(key)?;
        if layers.iter().any(|l| !self.blobs.available(&l.digest)) {
            return None;
        }
        let config_bytes = self.blobs.get(&config).ok()?;
        let state = state_from_config(&config_bytes, layers, "cache").ok()?;
        Some(Hit { state })
    }

    /// Record the state after a step. Blobs are already synced by the blob store.
    pub fn put(&self, key: &CacheKey, state: &ImageState) -> Result<(), CacheError> {
        let config = self.blobs.put(&state.config_json())?;
        let layers: Vec<Value> = state.layers.iter().map(LayerRef::to_json).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let doc = json!({"config": config.to_string(), "layers": layers, "created": now});
        let p = self.path(key);
        write_atomic(&p, &canonical_json(&doc)).map_err(|source| CacheError::Io { path: p, source })
    }

    /// Every entry: (path, created time, config digest, layer digests).
    pub fn entries(&self) -> Vec<(PathBuf, u64, Option<Digest>, Vec<Digest>)> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let Ok(bytes) = fs::read(&p) else { continue };
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let created = v["created"].as_u64().unwrap_or(0);
            let config = v["config"].as_str().and_then(|c| c.parse().ok());
            let layers = v["layers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|l| l["digest"].as_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            out.push((p, created, config, layers));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A step that has a cache entry after a build: its stage and key (what a cache export
/// writes).
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub stage: usize,
    pub key: CacheKey,
}
