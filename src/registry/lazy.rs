//! Layers known to be at a registry but not downloaded. A build pulls a base image's manifest
//! and config, and an imported cache's records, and leaves their layers where they are: a
//! build whose steps all hit never reads them, and a push to the same registry mounts them.
//! The first reader of a layer's bytes (a RUN's snapshot, an export, an SBOM scan) fetches
//! it through [`RegistryBlobs`], verified against its digest as any pull is.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::pull::{fetch_blob, origins_all, record_origin, Descriptor};
use super::Client;
use crate::oci::blobs::{write_atomic, BlobError, BlobSource, BlobStore};
use crate::oci::digest::Digest;

fn record_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("registry/lazy").join(d.hex())
}

/// Remember that `registry/repository` holds the blob `d`, to be fetched when needed.
pub fn remember(root: &Path, d: &Descriptor, registry: &str, repository: &str) {
    record_origin(root, &d.digest, registry, repository);
    let doc = json!({"size": d.size, "mediaType": d.media_type});
    let _ = write_atomic(&record_path(root, &d.digest), doc.to_string().as_bytes());
}

/// The descriptor a lazy blob was remembered with.
fn recorded(root: &Path, d: &Digest) -> Option<Descriptor> {
    let v: Value = serde_json::from_slice(&fs::read(record_path(root, d)).ok()?).ok()?;
    Some(Descriptor {
        digest: d.clone(),
        size: v["size"].as_u64()?,
        media_type: v["mediaType"].as_str().unwrap_or("").to_string(),
    })
}

/// Forget the lazy blobs not in `live` (cache prune); returns how many were forgotten.
pub fn forget_except(root: &Path, live: &std::collections::BTreeSet<Digest>) -> usize {
    let Ok(rd) = fs::read_dir(root.join("registry/lazy")) else {
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

/// The blob source of a store: its lazy blobs, fetched from the registries remembered for
/// them with the build's client (its credentials, mirrors and retries).
pub struct RegistryBlobs {
    root: PathBuf,
    client: Arc<Client>,
}

impl RegistryBlobs {
    pub fn new(root: &Path, client: Arc<Client>) -> RegistryBlobs {
        RegistryBlobs {
            root: root.to_path_buf(),
            client,
        }
    }
}

impl BlobSource for RegistryBlobs {
    fn knows(&self, d: &Digest) -> bool {
        record_path(&self.root, d).is_file()
    }

    fn fetch(&self, d: &Digest, into: &BlobStore) -> Result<(), BlobError> {
        let fail = |msg: String| BlobError::Fetch {
            digest: d.clone(),
            msg,
        };
        let desc =
            recorded(&self.root, d).ok_or_else(|| fail("no record of where it is".into()))?;
        let mut tried = Vec::new();
        for origin in origins_all(&self.root, d) {
            // `registry/repository`, where the registry part holds no '/'.
            let Some((registry, repository)) = origin.split_once('/') else {
                continue;
            };
            let fetched = self
                .client
                .endpoint(registry)
                .and_then(|ep| fetch_blob(&self.client, &ep, into, repository, &desc));
            match fetched {
                Ok(_) => {
                    let _ = fs::remove_file(record_path(&self.root, d));
                    return Ok(());
                }
                Err(e) => tried.push(format!("{}: {}", origin, e)),
            }
        }
        if tried.is_empty() {
            return Err(fail("no registry is known to hold it".into()));
        }
        Err(fail(tried.join("; ")))
    }
}
