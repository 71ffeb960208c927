//! Layers known to be at a registry but not downloaded. A build pulls a base image's manifest
//! and config, and an imported cache's records, and leaves their layers where they are: a
//! build whose steps all hit never reads them, and a push to the same registry mounts them.
//! The first reader of a layer's bytes (a RUN's snapshot, an export, an SBOM scan) fetches
//! it through [`RegistryBlobs`], verified against its digest as any pull is.

use std::sync::Arc;

use super::origins::OriginDirs;
use super::pull::fetch_blob;
use super::Client;
use crate::oci::blobs::{BlobError, BlobSource, BlobStore};
use crate::oci::digest::Digest;

/// The blob source of a store: its lazy blobs, fetched from the registries remembered for
/// them with the build's client (its credentials, mirrors and retries).
pub struct RegistryBlobs {
    origins: OriginDirs,
    client: Arc<Client>,
}

impl RegistryBlobs {
    pub fn new(origins: OriginDirs, client: Arc<Client>) -> RegistryBlobs {
        RegistryBlobs { origins, client }
    }
}

impl BlobSource for RegistryBlobs {
    fn knows(&self, d: &Digest) -> bool {
        self.origins.is_lazy(d)
    }

    fn fetch(&self, d: &Digest, into: &BlobStore) -> Result<(), BlobError> {
        let fail = |msg: String| BlobError::Fetch {
            digest: d.clone(),
            msg,
        };
        let desc = self
            .origins
            .lazy_descriptor(d)
            .ok_or_else(|| fail("no record of where it is".into()))?;
        let mut tried = Vec::new();
        for origin in self.origins.all(d) {
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
                    self.origins.forget_lazy(d);
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
