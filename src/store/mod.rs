//! The local store under `--root`: content-addressed blobs, named references
//! (`name:tag` -> manifest digest) in one JSON file replaced atomically, and a lock file that
//! serialises reference updates between concurrent builders. `fsck` re-hashes everything.
//! [`layout`] names every directory and file under the root; nothing else joins paths onto it.

pub mod layout;
pub mod sources;

pub use layout::{image_build_record, image_of_build_record, Bucket, Memo, StoreFile};

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fs2::FileExt;

use crate::oci::blobs::{write_atomic, BlobError, BlobStore};
use crate::oci::digest::Digest;
use crate::oci::image::{self, ImageError, StoredImage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path} is damaged: {msg}")]
    Damaged { path: PathBuf, msg: String },
    #[error("no image named {0:?} in the store")]
    NotFound(String),
    #[error("invalid image name {0:?}: {1}")]
    BadName(String, String),
    #[error("{0} is not in the store, and pulling it failed: {1}")]
    Pull(String, Box<crate::registry::RegistryError>),
}

impl StoreError {
    /// What the user can do about it, when something can be said.
    pub fn hint(&self) -> Option<String> {
        match self {
            StoreError::Pull(_, e) => e.hint(),
            _ => None,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default root: `$BUILDER_ROOT`, else `$XDG_DATA_HOME/builder`, else `~/.local/share/builder`.
pub fn default_root() -> PathBuf {
    if let Some(r) = std::env::var_os("BUILDER_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(r);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|r| !r.is_empty()) {
        return PathBuf::from(x).join("builder");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/builder")
}

/// The name the store files an image under: docker's short form of the reference, with
/// `:latest` when it names no tag (`docker.io/library/app` is `app:latest`).
pub fn normalize_name(name: &str) -> Result<String, StoreError> {
    let r = crate::registry::Reference::parse(name)
        .map_err(|e| StoreError::BadName(name.to_string(), e.reason))?;
    Ok(r.with_default_tag().familiar())
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    layout: layout::Layout,
    pub blobs: BlobStore,
}

/// Held while references are read-modified-written.
pub struct StoreLock {
    _file: fs::File,
}

impl Store {
    /// Open (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(root).map_err(io_at(root))?;
        // Absolute, so paths built from it mean the same after any chdir.
        let root = &root.canonicalize().map_err(io_at(root))?;
        // Only its owner may look inside: snapshots hold image files as they are, setuid-root
        // binaries included, which another local user must never reach.
        let private = fs::metadata(root)
            .map(|m| m.permissions().mode() & 0o077 == 0)
            .unwrap_or(false);
        if !private {
            fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_at(root))?;
        }
        let layout = layout::Layout::new(root);
        let blobs = BlobStore::open(&layout.dir(Bucket::Blobs), &layout.dir(Bucket::Tmp))?;
        Ok(Store {
            root: root.to_path_buf(),
            layout,
            blobs,
        })
    }

    /// The store as pulls and pushes see it: blobs, and where blob origins are kept.
    pub fn local(&self) -> crate::registry::Local<'_> {
        crate::registry::Local {
            blobs: &self.blobs,
            origins: self.origins(),
        }
    }

    /// Where blobs' registry origins and lazy layers are recorded.
    pub fn origins(&self) -> crate::registry::origins::OriginDirs {
        crate::registry::origins::OriginDirs {
            origins: self.dir(Bucket::Origins),
            lazy: self.dir(Bucket::Lazy),
        }
    }

    /// The store's root directory (to show, or to keep out of a layout; never to join onto:
    /// see [`Store::dir`]).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A bucket's directory.
    pub fn dir(&self, bucket: Bucket) -> PathBuf {
        self.layout.dir(bucket)
    }

    /// One of the store's single files.
    pub fn file(&self, file: StoreFile) -> PathBuf {
        self.layout.file(file)
    }

    /// A memo bucket.
    pub fn memo(&self, bucket: Bucket) -> Memo {
        self.layout.memo(bucket)
    }

    /// A private scratch directory under the store (same filesystem, so renames are atomic).
    pub fn scratch_dir(&self, what: &str) -> Result<tempfile::TempDir, StoreError> {
        let base = self.dir(Bucket::Tmp);
        fs::create_dir_all(&base).map_err(io_at(&base))?;
        tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix(what))
            .tempdir_in(&base)
            .map_err(io_at(&base))
    }

    /// Remove the scratch that builds which died left behind (entries of `tmp/` whose owning
    /// process is gone); returns the bytes freed. Safe beside running builds: it never touches
    /// what a live process owns.
    pub fn clean_stale_scratch(&self) -> u64 {
        let Ok(rd) = fs::read_dir(self.dir(Bucket::Tmp)) else {
            return 0;
        };
        let mut freed = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = crate::oci::blobs::scratch_owner(&name) else {
                continue;
            };
            if crate::oci::blobs::process_exists(pid) {
                continue;
            }
            freed += remove_counting(&e.path());
        }
        freed
    }

    /// Take the store's exclusive lock.
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        let p = self.file(StoreFile::Lock);
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_at(&p))?;
        f.lock_exclusive().map_err(io_at(&p))?;
        Ok(StoreLock { _file: f })
    }

    fn refs_path(&self) -> PathBuf {
        self.file(StoreFile::Refs)
    }

    /// All references.
    pub fn refs(&self) -> Result<BTreeMap<String, Digest>, StoreError> {
        let p = self.refs_path();
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io_at(&p)(e)),
        };
        let raw: BTreeMap<String, String> =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
                path: p.clone(),
                msg: e.to_string(),
            })?;
        raw.into_iter()
            .map(|(k, v)| {
                let d =
                    v.parse()
                        .map_err(|e: crate::oci::digest::BadDigest| StoreError::Damaged {
                            path: p.clone(),
                            msg: e.to_string(),
                        })?;
                Ok((k, d))
            })
            .collect()
    }

    fn write_refs(&self, refs: &BTreeMap<String, Digest>) -> Result<(), StoreError> {
        let raw: BTreeMap<&String, String> = refs.iter().map(|(k, v)| (k, v.to_string())).collect();
        let bytes = serde_json::to_vec_pretty(&raw).unwrap_or_default();
        let p = self.refs_path();
        write_atomic(&p, &bytes).map_err(io_at(&p))
    }

    /// Point `name` at `digest`.
    pub fn tag(&self, name: &str, digest: &Digest) -> Result<String, StoreError> {
        let name = normalize_name(name)?;
        let _lock = self.lock()?;
        let mut refs = self.refs()?;
        refs.insert(name.clone(), digest.clone());
        self.write_refs(&refs)?;
        Ok(name)
    }

    fn attested_path(&self, digest: &Digest) -> PathBuf {
        self.dir(Bucket::Attested).join(digest.hex())
    }

    /// The index that holds `digest` (an image, or an index of images) together with the
    /// attestations a build recorded for it, when there is one in the store.
    pub fn attested(&self, digest: &Digest) -> Option<Digest> {
        let text = fs::read_to_string(self.attested_path(digest)).ok()?;
        let index: Digest = text.trim().parse().ok()?;
        self.blobs.contains(&index).then_some(index)
    }

    /// Record that `index` holds `digest` with its attestations (see [`Store::attested`]).
    pub fn set_attested(&self, digest: &Digest, index: &Digest) -> Result<(), StoreError> {
        let p = self.attested_path(digest);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir).map_err(io_at(dir))?;
        }
        write_atomic(&p, index.to_string().as_bytes()).map_err(io_at(&p))
    }

    /// Every attestation the store holds about `digest` (an image, or an index of images)
    /// and about the images it lists: those in the index it is itself (BuildKit's layout),
    /// in the index recorded beside it, and in those recorded beside each image. Each once,
    /// in that order.
    pub fn attestations_of(&self, digest: &Digest) -> Vec<image::StoredAttestation> {
        let mut holders = vec![digest.clone()];
        holders.extend(self.attested(digest));
        if let Ok((images, _)) = image::load_all(&self.blobs, digest) {
            for i in &images {
                holders.extend(self.attested(&i.manifest_digest));
            }
        }
        let mut out: Vec<image::StoredAttestation> = Vec::new();
        for h in holders {
            for a in image::load_attestations(&self.blobs, &h) {
                if !out.iter().any(|o| o.manifest_digest == a.manifest_digest) {
                    out.push(a);
                }
            }
        }
        out
    }

    /// Record attestations (already stored) about `image` that came from elsewhere (a
    /// pull's referrers, a layout): kept beside the image with those it had, in an index
    /// of the image and its attestations, so that pushes, `diff` and `verify` find them.
    pub fn keep_attestations(
        &self,
        image: &StoredImage,
        attestations: &[image::StoredAttestation],
    ) -> Result<(), StoreError> {
        let mut all: Vec<image::StoredAttestation> = self
            .attested(&image.manifest_digest)
            .map(|x| image::load_attestations(&self.blobs, &x))
            .unwrap_or_default();
        let before = all.len();
        for a in attestations
            .iter()
            .filter(|a| a.subject == image.manifest_digest)
        {
            if !all.iter().any(|o| o.manifest_digest == a.manifest_digest) {
                all.push(a.clone());
            }
        }
        if all.len() == before {
            return Ok(());
        }
        let index = image::commit_index(&self.blobs, std::slice::from_ref(image), &all)?;
        self.set_attested(&image.manifest_digest, &index.digest)
    }

    /// Remove a name; returns the digest it pointed at.
    pub fn untag(&self, name: &str) -> Result<Digest, StoreError> {
        let name = normalize_name(name)?;
        let _lock = self.lock()?;
        let mut refs = self.refs()?;
        let d = refs
            .remove(&name)
            .ok_or_else(|| StoreError::NotFound(name.clone()))?;
        self.write_refs(&refs)?;
        Ok(d)
    }

    /// Resolve a name, or a `sha256:` digest / unique digest prefix of a stored manifest.
    pub fn resolve(&self, reference: &str) -> Result<Digest, StoreError> {
        if let Ok(d) = reference.parse::<Digest>() {
            if self.blobs.contains(&d) {
                return Ok(d);
            }
            return Err(StoreError::NotFound(reference.to_string()));
        }
        let name = normalize_name(reference)?;
        self.refs()?
            .get(&name)
            .cloned()
            .ok_or(StoreError::NotFound(name))
    }

    /// Load a stored image by name or digest; from an index, this machine's platform, else
    /// whichever platform the store has.
    pub fn image(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let d = self.resolve(reference)?;
        let host = crate::oci::platform::Platform::host().spec();
        Ok(image::load_for(&self.blobs, &d, &host)?)
    }

    /// Load a stored image by name or digest for `platform`: from an index that lists the
    /// platform but whose manifest for it is not stored (a pull took another), `NotFound`,
    /// so that a build pulls it.
    pub fn image_for(&self, reference: &str, platform: &str) -> Result<StoredImage, StoreError> {
        let d = self.resolve(reference)?;
        if let Some(entries) = self
            .blobs
            .get(&d)
            .ok()
            .and_then(|b| image::index_entries(&b))
        {
            let listed = entries
                .iter()
                .find(|(_, spec)| spec == platform || spec.starts_with(&format!("{}/", platform)));
            if let Some((m, _)) = listed {
                if !self.blobs.contains(m) {
                    return Err(StoreError::NotFound(format!(
                        "{} for {}",
                        reference, platform
                    )));
                }
            }
        }
        Ok(image::load_for(&self.blobs, &d, platform)?)
    }

    /// Check every blob's hash and every reference's image; returns the problems found.
    /// Check that a stored layer's uncompressed content hashes to its claimed diff_id.
    fn verify_diff_id(&self, layer: &crate::oci::image::LayerRef) -> Result<(), String> {
        let path = self.blobs.path(&layer.digest);
        let stream = crate::oci::unpack::open_layer(&path)
            .map_err(|e| format!("layer {}: {}", layer.digest, e))?;
        let (found, _) = crate::oci::digest::HashingReader::new(stream)
            .finish()
            .map_err(|e| format!("layer {}: {}", layer.digest, e))?;
        if found != layer.diff_id {
            return Err(format!(
                "layer {}: its content has diff_id {}, but the image config says {}",
                layer.digest, found, layer.diff_id
            ));
        }
        Ok(())
    }

    pub fn fsck(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        for d in self.blobs.list()? {
            if let Err(e) = self.blobs.verify(&d) {
                problems.push(e.to_string());
            }
        }
        let refs = match self.refs() {
            Ok(r) => r,
            Err(e) => {
                problems.push(e.to_string());
                BTreeMap::new()
            }
        };
        for (name, d) in refs {
            match image::load_all(&self.blobs, &d) {
                Ok((images, _)) if images.is_empty() => problems.push(format!(
                    "{}: an index none of whose manifests is stored",
                    name
                )),
                Ok((images, _)) => {
                    for l in images.iter().flat_map(|i| &i.state.layers) {
                        if self.blobs.is_lazy(&l.digest) {
                            // At its registry, and verified when it is fetched.
                            continue;
                        }
                        if !self.blobs.contains(&l.digest) {
                            problems.push(format!("{}: layer {} is missing", name, l.digest));
                        } else if let Err(e) = self.verify_diff_id(l) {
                            // Snapshots are named by chain ids built from diff_ids: a diff_id
                            // the content does not match would name a snapshot wrongly.
                            problems.push(format!("{}: {}", name, e));
                        }
                    }
                }
                Err(e) => problems.push(format!("{}: {}", name, e)),
            }
        }
        Ok(problems)
    }
}

/// The size of what is under `p` (files' lengths), without following symlinks.
pub fn tree_size(p: &Path) -> u64 {
    walkdir::WalkDir::new(p)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Remove `p` (a file or a tree); returns the bytes it held.
pub fn remove_counting(p: &Path) -> u64 {
    let size = tree_size(p);
    let removed = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    };
    if removed.is_ok() {
        size
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_latest() {
        assert_eq!(normalize_name("app").unwrap(), "app:latest");
        assert_eq!(
            normalize_name("localhost:5000/app").unwrap(),
            "localhost:5000/app:latest"
        );
        assert_eq!(normalize_name("app:1.0").unwrap(), "app:1.0");
        assert!(normalize_name("App").is_err());
        assert!(normalize_name("app:").is_err());
    }

    #[test]
    fn tag_resolve_untag() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let d = s.blobs.put(b"{}").unwrap();
        s.tag("x", &d).unwrap();
        assert_eq!(s.resolve("x:latest").unwrap(), d);
        assert_eq!(s.untag("x").unwrap(), d);
        assert!(matches!(s.resolve("x"), Err(StoreError::NotFound(_))));
    }
}
