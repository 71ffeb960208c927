//! Where blobs live in registries, as this store has seen them: every `registry/repository`
//! known to hold a blob (a push mounts from one instead of uploading), and the descriptors
//! of blobs left at their registry (lazy layers, fetched by their first reader). The one
//! place that records either; `pull`, `push`, `lazy` and imported caches all go through it.

use std::fs;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::oci::blobs::write_atomic;
use crate::oci::digest::Digest;
use crate::oci::document::Descriptor;

/// The two record directories of a store (the store's layout names them).
#[derive(Debug, Clone)]
pub struct OriginDirs {
    /// One file per blob: the `registry/repository` lines known to hold it.
    pub origins: PathBuf,
    /// One file per lazy blob: its size and media type.
    pub lazy: PathBuf,
}

impl OriginDirs {
    fn origins_path(&self, d: &Digest) -> PathBuf {
        self.origins.join(d.hex())
    }

    fn lazy_path(&self, d: &Digest) -> PathBuf {
        self.lazy.join(d.hex())
    }

    /// Remember that `registry/repository` holds blob `d`, so a push to another repository
    /// of the same registry can mount it instead of uploading it.
    pub fn record(&self, d: &Digest, registry: &str, repository: &str) {
        let p = self.origins_path(d);
        let line = format!("{}/{}", registry, repository);
        let mut lines: Vec<String> = fs::read_to_string(&p)
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default();
        if lines.contains(&line) {
            return;
        }
        lines.push(line);
        let _ = fs::create_dir_all(&self.origins);
        let _ = write_atomic(&p, (lines.join("\n") + "\n").as_bytes());
    }

    /// Every `registry/repository` known to hold blob `d`, first remembered first.
    pub fn all(&self, d: &Digest) -> Vec<String> {
        fs::read_to_string(self.origins_path(d))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Repositories of `registry` known to hold blob `d`.
    pub fn in_registry(&self, d: &Digest, registry: &str) -> Vec<String> {
        self.all(d)
            .iter()
            .filter_map(|l| l.strip_prefix(registry)?.strip_prefix('/'))
            .map(str::to_string)
            .collect()
    }

    /// Remember that `registry/repository` holds the blob `d`, to be fetched when needed.
    pub fn remember_lazy(&self, d: &Descriptor, registry: &str, repository: &str) {
        self.record(&d.digest, registry, repository);
        let doc = json!({"size": d.size, "mediaType": d.media_type});
        let _ = write_atomic(&self.lazy_path(&d.digest), doc.to_string().as_bytes());
    }

    /// The descriptor a lazy blob was remembered with.
    pub fn lazy_descriptor(&self, d: &Digest) -> Option<Descriptor> {
        let v: Value = serde_json::from_slice(&fs::read(self.lazy_path(d)).ok()?).ok()?;
        Some(Descriptor::new(
            v["mediaType"].as_str().unwrap_or(""),
            d.clone(),
            v["size"].as_u64()?,
        ))
    }

    /// Whether blob `d` is remembered as left at a registry.
    pub fn is_lazy(&self, d: &Digest) -> bool {
        self.lazy_path(d).is_file()
    }

    /// Forget that blob `d` is lazy (it is in the store now).
    pub fn forget_lazy(&self, d: &Digest) {
        let _ = fs::remove_file(self.lazy_path(d));
    }

    /// Forget the lazy blobs not in `live` (cache prune); returns how many were forgotten.
    pub fn forget_lazy_except(&self, live: &std::collections::BTreeSet<Digest>) -> usize {
        let Ok(rd) = fs::read_dir(&self.lazy) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = format!("sha256:{}", name)
                .parse::<Digest>()
                .is_ok_and(|d| live.contains(&d));
            if !keep && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_lazy_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = OriginDirs {
            origins: dir.path().join("o"),
            lazy: dir.path().join("l"),
        };
        let d = Digest::of(b"blob");
        dirs.record(&d, "r.example", "a/b");
        dirs.record(&d, "r.example", "a/b");
        dirs.record(&d, "other.example", "c");
        assert_eq!(dirs.all(&d), ["r.example/a/b", "other.example/c"]);
        assert_eq!(dirs.in_registry(&d, "r.example"), ["a/b"]);
        let desc = Descriptor::new("application/x", Digest::of(b"lazy"), 4);
        dirs.remember_lazy(&desc, "r.example", "x");
        assert_eq!(dirs.lazy_descriptor(&desc.digest), Some(desc.clone()));
        assert_eq!(dirs.forget_lazy_except(&[desc.digest.clone()].into()), 0);
        assert_eq!(dirs.forget_lazy_except(&Default::default()), 1);
        assert_eq!(dirs.lazy_descriptor(&desc.digest), None);
    }
}
