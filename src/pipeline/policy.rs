//! `--base-policy FILE`: what every base image (`FROM`, `COPY --from`, `RUN --mount=from`)
//! must be before anything runs. The file is JSON:
//!
//! ```json
//! {"requireDigest": true, "signedBy": ["keys/base.pub"]}
//! ```
//!
//! `requireDigest`: each reference names a digest (`name@sha256:…`); `signedBy`: each
//! image has a signature (a referrer, in the store or at its registry) that one of these
//! public keys checks. Key paths are relative to the policy file.

use std::path::Path;

use crate::attest::signing::PublicKey;
use crate::failure::CliError;
use crate::oci::image::{StoredImage, ARTIFACT_SIGNATURE, SIGNATURE_ANNOTATION};
use crate::registry::{Client, Reference};
use crate::store::sources::ImageSource;
use crate::store::Store;

/// A parsed base-image policy.
#[derive(Debug, Clone, Default)]
pub struct BasePolicy {
    /// Where it was read from, for messages.
    pub file: String,
    pub require_digest: bool,
    pub signed_by: Vec<(String, PublicKey)>,
}

impl BasePolicy {
    /// Read a policy file.
    pub fn load(path: &Path) -> Result<BasePolicy, CliError> {
        let bytes = std::fs::read(path).map_err(|e| CliError::io(path, e))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| CliError::msg(format!("{}: not JSON: {}", path.display(), e)))?;
        let obj = v
            .as_object()
            .ok_or_else(|| CliError::msg(format!("{}: want a JSON object", path.display())))?;
        for k in obj.keys() {
            if k != "requireDigest" && k != "signedBy" {
                return Err(CliError::msg(format!(
                    "{}: unknown field {:?} (requireDigest, signedBy)",
                    path.display(),
                    k
                )));
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut policy = BasePolicy {
            file: path.display().to_string(),
            require_digest: v["requireDigest"].as_bool().unwrap_or(false),
            signed_by: Vec::new(),
        };
        for k in v["signedBy"].as_array().into_iter().flatten() {
            let rel = k.as_str().ok_or_else(|| {
                CliError::msg(format!("{}: signedBy lists key files", path.display()))
            })?;
            let key = PublicKey::from_pem_file(&dir.join(rel)).map_err(CliError::msg)?;
            policy.signed_by.push((rel.to_string(), key));
        }
        Ok(policy)
    }

    /// Check one base: `reference` as the build file gives it, resolved to `image`.
    pub fn check(
        &self,
        store: &Store,
        client: &Client,
        reference: &str,
        image: &StoredImage,
    ) -> Result<(), CliError> {
        let refuse = |why: String| {
            CliError::msg(format!(
                "base image {} is refused by the policy {}: {}",
                reference, self.file, why
            ))
        };
        if self.require_digest {
            let pinned = match ImageSource::parse(reference) {
                ImageSource::Store(name) => {
                    Reference::parse(&name).is_ok_and(|r| r.digest.is_some())
                }
                _ => false,
            };
            if !pinned {
                return Err(refuse("it is not pinned by digest (name@sha256:…)".into()));
            }
        }
        if self.signed_by.is_empty() {
            return Ok(());
        }
        if let ImageSource::Store(name) = ImageSource::parse(reference) {
            // Signatures at the registry the base came from come along.
            if let Ok(r) = Reference::parse(&name) {
                if let Ok(found) = crate::registry::pull::fetch_referred_attestations(
                    client,
                    &store.local(),
                    &r.registry,
                    &r.repository,
                    &image.manifest_digest,
                    &r.familiar(),
                ) {
                    store.keep_attestations(image, &found)?;
                }
            }
        }
        if signed_by_any(store, image, &self.signed_by).is_some() {
            return Ok(());
        }
        let keys: Vec<&str> = self.signed_by.iter().map(|(n, _)| n.as_str()).collect();
        Err(refuse(format!(
            "no signature of {} by {}",
            image.manifest_digest,
            keys.join(" or ")
        )))
    }
}

/// The name of the first key in `keys` that a signature of `image` (kept in the store)
/// checks with.
pub fn signed_by_any<'k>(
    store: &Store,
    image: &StoredImage,
    keys: &'k [(String, PublicKey)],
) -> Option<&'k str> {
    for a in store.attestations_of(&image.manifest_digest) {
        if a.artifact_type != ARTIFACT_SIGNATURE || a.subject != image.manifest_digest {
            continue;
        }
        let Ok(bytes) = store.blobs.get(&a.manifest_digest) else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        for l in m["layers"].as_array().into_iter().flatten() {
            let Some(sig) = l["annotations"][SIGNATURE_ANNOTATION]
                .as_str()
                .and_then(crate::attest::signing::decode)
            else {
                continue;
            };
            let Some(payload) = l["digest"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .and_then(|d| store.blobs.get(&d).ok())
            else {
                continue;
            };
            if crate::attest::signing::payload_subject(&payload).as_deref()
                != Some(image.manifest_digest.to_string().as_str())
            {
                continue;
            }
            if let Some((name, _)) = keys.iter().find(|(_, k)| k.verifies(&payload, &sig)) {
                return Some(name);
            }
        }
    }
    None
}
