//! What a build attests: provenance (SLSA, from the solver's trace) and an SBOM (from the
//! layers' scans), as in-toto statements stored as blobs, a provenance statement remembered
//! by what it was made of so an unchanged build writes none.

use std::path::Path;

use crate::attest::{provenance, sbom};
use crate::failure::CliError;
use crate::oci::digest::Digest;
use crate::solver;
use crate::store::Store;

/// Which attestations a build records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttestOptions {
    pub provenance: Option<provenance::Mode>,
    pub sbom: bool,
    /// How the attestations travel with the image.
    pub layout: AttestLayout,
}

/// How attestations travel with an image (`--attest-layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttestLayout {
    /// OCI 1.1 referrers: names point at the image; each image's attestation manifest has
    /// it as `subject`, listed untagged in a layout's index.json and pushed so that the
    /// registry's referrers API (or its `sha256-<digest>` fallback tag) lists it.
    #[default]
    Referrers,
    /// BuildKit's layout: names point at an index listing each image and its attestation
    /// manifest, for tools that read only that.
    Index,
}

/// Where the build file is, as provenance names it: its path in the context, else its name
/// alone (no absolute path goes into provenance).
pub fn build_file_in_context(file: &Path, context: &Path, name: &str) -> String {
    file.canonicalize()
        .ok()
        .and_then(|f| {
            f.strip_prefix(context)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| {
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| name.to_string())
        })
}

/// The statements a build's image gets: provenance and SBOM, as `attest` asks, in canonical
/// JSON (each a function of the build's inputs alone), stored as blobs: their predicate
/// types, digests and sizes.
pub fn statements(
    store: &Store,
    invocation: &provenance::Invocation,
    attest: AttestOptions,
    outcome: &solver::Outcome,
) -> Result<Vec<(String, Digest, u64)>, CliError> {
    let image = &outcome.image;
    let platform = crate::oci::image::platform_of(image);
    let mut statements = Vec::new();
    if let Some(mode) = attest.provenance {
        // Each platform's statement describes that platform's build alone, so an index
        // joined from per-platform builds (`imagetools create`) is the one a single build
        // of every platform pushes.
        let inv = provenance::Invocation {
            mode,
            platforms: vec![platform.clone()],
            build_file_digest: invocation.build_file_digest.clone(),
            options: invocation.options.clone(),
            ..*invocation
        };
        let (doc, files) =
            provenance::statement_parts(&inv, &platform, &image.manifest_digest, &outcome.trace);
        let (digest, size) = put_statement(store, &doc, &files)?;
        statements.push((provenance::PREDICATE_TYPE.to_string(), digest, size));
    }
    if attest.sbom {
        let cache = store.dir(crate::store::Bucket::Sbom);
        let mut scans = Vec::new();
        for l in &image.state.layers {
            scans.push(
                sbom::scan_cached(&store.blobs, l, &cache)
                    .map_err(|e| CliError::msg(format!("SBOM: layer {}: {}", l.digest, e)))?,
            );
        }
        let (packages, os_id) = sbom::merge(&scans);
        let doc = sbom::document(&packages, os_id.as_deref(), &platform, invocation.epoch);
        let st = sbom::statement(doc, &platform, &image.manifest_digest);
        let bytes = crate::oci::image::canonical_json(&st);
        let digest = store
            .blobs
            .put(&bytes)
            .map_err(|e| CliError::msg(e.to_string()))?;
        statements.push((sbom::PREDICATE_TYPE.to_string(), digest, bytes.len() as u64));
    }
    Ok(statements)
}

/// Store the provenance statement whose parts are `doc` and `files` (see
/// [`provenance::statement_parts`]). The digest and size of the statement a `doc` made are
/// remembered (`cache/statements/`): `doc` names the files by their digest, so while that
/// blob is in the store, a build whose inputs did not change neither writes nor hashes its
/// context's files again.
fn put_statement(store: &Store, doc: &[u8], files: &[u8]) -> Result<(Digest, u64), CliError> {
    let memo = store.memo(crate::store::Bucket::Statements);
    let memo_key = Digest::of(doc).hex().to_string();
    let remembered = memo.get(&memo_key).and_then(|b| {
        let s = String::from_utf8(b).ok()?;
        let (d, size) = s.trim().split_once(' ')?;
        Some((d.parse::<Digest>().ok()?, size.parse::<u64>().ok()?))
    });
    if let Some((d, size)) = remembered {
        if store.blobs.contains(&d) {
            return Ok((d, size));
        }
    }
    let bytes = provenance::splice_files(doc, files);
    let digest = store
        .blobs
        .put(&bytes)
        .map_err(|e| CliError::msg(e.to_string()))?;
    memo.put(
        &memo_key,
        format!("{} {}\n", digest, bytes.len()).as_bytes(),
    );
    Ok((digest, bytes.len() as u64))
}

/// A signature of `image` by `key`, stored as a referrer manifest.
pub fn signature(
    store: &Store,
    key: &crate::attest::signing::SigningKey,
    image: &crate::oci::image::StoredImage,
) -> Result<crate::oci::image::StoredAttestation, CliError> {
    let payload = crate::attest::signing::payload(&image.manifest_digest);
    let sig = key.sign(&payload).map_err(CliError::msg)?;
    crate::oci::image::commit_signature(
        &store.blobs,
        image,
        &payload,
        &crate::attest::signing::encode(&sig),
    )
    .map_err(|e| CliError::msg(e.to_string()))
}
