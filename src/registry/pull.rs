//! Pull: resolve a reference to a manifest (negotiating OCI and Docker schema 2 types, picking
//! the platform from an index), then stream the config and layers into the store in parallel,
//! each verified against its digest, resuming with `Range` after a dropped connection, and
//! skipping blobs the store already has. The manifest is stored last, byte for byte, so the
//! pulled image keeps the registry's digest.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::client::{backoff, scope, Body, Client, Direction, Endpoint, Transfer};
use super::reference::Reference;
use super::{Local, RegistryError};
use crate::oci::blobs::BlobStore;
use crate::oci::digest::Digest;
use crate::oci::image::{
    self, StoredImage, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MEDIA_INDEX, MEDIA_MANIFEST,
};
use crate::oci::platform::Platform;

pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
const MANIFEST_LIMIT: u64 = 4 << 20;
/// Blobs downloaded at once.
const PARALLEL_BLOBS: usize = 4;

/// A manifest or index as the registry served it.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
}

pub use crate::oci::document::Descriptor;

/// The descriptor at `v` (`what` names its document in errors).
pub fn descriptor(v: &Value, what: &str) -> Result<Descriptor, RegistryError> {
    let digest = v["digest"].as_str().unwrap_or("").parse().map_err(
        |e: crate::oci::digest::BadDigest| RegistryError::Protocol(format!("{}: {}", what, e)),
    )?;
    // Every read of a blob stops at its descriptor's size, so the size must be there, and
    // 0 only for the empty blob: otherwise a registry could stream without end.
    let size = v["size"].as_u64().ok_or_else(|| {
        RegistryError::Protocol(format!("{}: descriptor of {} has no size", what, digest))
    })?;
    if size == 0 && digest != Digest::of(b"") {
        return Err(RegistryError::Protocol(format!(
            "{}: descriptor of {} says size 0, which only the empty blob has",
            what, digest
        )));
    }
    Ok(Descriptor::new(
        v["mediaType"].as_str().unwrap_or(""),
        digest,
        size,
    ))
}

/// The media type of a manifest document: the header when specific, else the body's own.
fn manifest_media_type(header: Option<&str>, v: &Value) -> String {
    let header = header
        .map(|h| h.split(';').next().unwrap_or("").trim().to_string())
        .filter(|h| h.starts_with("application/vnd."));
    header
        .or_else(|| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            if v.get("manifests").is_some() {
                MEDIA_INDEX.to_string()
            } else {
                MEDIA_MANIFEST.to_string()
            }
        })
}

pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// GET a manifest by tag or digest; a digest asked for is verified.
pub fn get_manifest(
    client: &Client,
    ep: &Endpoint,
    repository: &str,
    reference: &str,
    display: &str,
) -> Result<Fetched, RegistryError> {
    let target = format!("/v2/{}/manifests/{}", repository, reference);
    let scopes = [scope(repository, "pull")];
    let mut last = String::new();
    for attempt in 1..=client.settings.attempts {
        let response = client.send(
            ep,
            "GET",
            &target,
            &[("Accept", MANIFEST_ACCEPT.to_string())],
            Body::Empty,
            &scopes,
        )?;
        if response.status() != 200 {
            let what = format!(
                "manifest {} (repository {:?}, tag or digest {:?})",
                display, repository, reference
            );
            return Err(ep.status_error("GET", &target, &what, response));
        }
        let header_type = response.header("content-type").map(str::to_string);
        let header_digest = response.header("docker-content-digest").map(str::to_string);
        let mut bytes = Vec::new();
        if let Err(e) = response
            .into_reader()
            .take(MANIFEST_LIMIT + 1)
            .read_to_end(&mut bytes)
        {
            last = e.to_string();
            std::thread::sleep(backoff(attempt));
            continue;
        }
        if bytes.len() as u64 > MANIFEST_LIMIT {
            return Err(RegistryError::Protocol(format!(
                "manifest {} is larger than {} bytes",
                display, MANIFEST_LIMIT
            )));
        }
        let digest = Digest::of(&bytes);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header_digest.filter(|h| h.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != digest.to_string() {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {}", display),
                    expected,
                    got: digest.to_string(),
                });
            }
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::Protocol(format!("manifest {} is not JSON: {}", display, e))
        })?;
        if v["schemaVersion"].as_u64() == Some(1) {
            return Err(RegistryError::Protocol(format!(
                "{} is a Docker schema 1 manifest, which builder does not support; push it again with a current tool",
                display
            )));
        }
        let media_type = manifest_media_type(header_type.as_deref(), &v);
        return Ok(Fetched {
            bytes,
            digest,
            media_type,
        });
    }
    Err(RegistryError::Transport {
        host: ep.registry.clone(),
        detail: format!("reading manifest {}: {}", display, last),
        attempts: client.settings.attempts,
    })
}

/// The entry of an index matching `platform` (a variant is matched when one is asked for).
pub fn choose_platform(
    index: &Value,
    platform: &Platform,
    display: &str,
) -> Result<Descriptor, RegistryError> {
    let list = index["manifests"].as_array().cloned().unwrap_or_default();
    let fits = |m: &Value| {
        m["platform"]["os"] == platform.os.as_str()
            && m["platform"]["architecture"] == platform.architecture.as_str()
            && platform
                .variant
                .as_ref()
                .map(|v| m["platform"]["variant"] == v.as_str())
                .unwrap_or(true)
    };
    match list.iter().find(|m| fits(m)) {
        Some(m) => descriptor(m, display),
        None => {
            let offered: Vec<String> = list
                .iter()
                .filter_map(|m| {
                    let p = &m["platform"];
                    let os = p["os"].as_str()?;
                    let arch = p["architecture"].as_str()?;
                    Some(match p["variant"].as_str() {
                        Some(v) => format!("{}/{}/{}", os, arch, v),
                        None => format!("{}/{}", os, arch),
                    })
                })
                .filter(|s| s != "unknown/unknown")
                .collect();
            Err(RegistryError::NotFound {
                what: format!("platform {} in {}", platform.spec(), display),
                detail: format!("the image index offers {}", offered.join(", ")),
            })
        }
    }
}

/// Removes a temporary file unless it was committed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Read from `reader` until `buf` is full, the body ends or a read fails: the HTTP client
/// hands a body over 8 KiB at a time, and a write and a hash update per buffer cost far
/// less than one per read. Returns the bytes read, and then `None` (the buffer is full),
/// `Some(Ok(()))` (the end) or `Some(Err(_))`; the bytes read before a failure count.
fn fill_from(reader: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<Result<(), String>>) {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => return (n, Some(Ok(()))),
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return (n, Some(Err(e.to_string()))),
        }
    }
    (n, None)
}

/// Download blob `d` of `repository` into the store (nothing when it is there already).
/// A connection that drops mid-body is resumed with a `Range` request.
pub fn fetch_blob(
    client: &Client,
    ep: &Endpoint,
    blobs: &BlobStore,
    repository: &str,
    d: &Descriptor,
) -> Result<bool, RegistryError> {
    if blobs.contains(&d.digest) {
        return Ok(false);
    }
    let what = format!("blob {} of {}/{}", d.digest, ep.registry, repository);
    let target = format!("/v2/{}/blobs/{}", repository, d.digest);
    let scopes = [scope(repository, "pull")];
    let (tmp, mut file) = blobs.temp_file()?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let io = |e: std::io::Error| RegistryError::Io {
        path: tmp.clone(),
        source: e,
    };
    let mut hasher = Sha256::new();
    let mut have = 0u64;
    let mut last = String::new();
    let mut complete = false;
    // The budget counts attempts in a row that brought no new bytes: a connection that keeps
    // breaking but makes progress each time still finishes.
    let mut attempt = 0u32;
    let mut have_before = 0u64;
    while attempt < client.settings.attempts {
        attempt = if have > have_before { 1 } else { attempt + 1 };
        have_before = have;
        if attempt > 1 {
            std::thread::sleep(backoff(attempt - 1));
        }
        if !last.is_empty() {
            client.notice(&format!(
                "{}: {}; resuming at byte {} (attempt {} of {})",
                what, last, have, attempt, client.settings.attempts
            ));
        }
        let headers: Vec<(&str, String)> = if have > 0 {
            vec![("Range", format!("bytes={}-", have))]
        } else {
            Vec::new()
        };
        let response = client.send(ep, "GET", &target, &headers, Body::Empty, &scopes)?;
        match response.status() {
            200 => {
                if have > 0 {
                    // The server ignored the range: start over.
                    file.set_len(0).map_err(io)?;
                    file.seek(SeekFrom::Start(0)).map_err(io)?;
                    hasher = Sha256::new();
                    have = 0;
                }
            }
            206 if have > 0 => {
                let start = response
                    .header("content-range")
                    .and_then(|r| r.strip_prefix("bytes "))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if start != Some(have) {
                    file.set_len(0).map_err(io)?;
                    file.seek(SeekFrom::Start(0)).map_err(io)?;
                    hasher = Sha256::new();
                    have = 0;
                    last = "the server resumed at the wrong offset".into();
                    continue;
                }
            }
            _ => return Err(ep.status_error("GET", &target, &what, response)),
        }
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut written_back = have;
        let outcome = loop {
            let (n, end) = fill_from(&mut reader, &mut buf);
            if n > 0 {
                file.write_all(&buf[..n]).map_err(io)?;
                hasher.update(&buf[..n]);
                have += n as u64;
                // Each window goes to disk while the next downloads (the blob stays cached:
                // an unpack often reads it next).
                if have - written_back >= crate::oci::blobs::WRITE_BEHIND_WINDOW {
                    crate::oci::blobs::start_writeback(&file, written_back, have - written_back);
                    written_back = have;
                }
                client.transfer(&Transfer {
                    direction: Direction::Pull,
                    digest: &d.digest,
                    done: have.min(d.size),
                    total: d.size,
                });
                if have > d.size {
                    break Err("the registry sent more bytes than the manifest says".to_string());
                }
            }
            match end {
                None => continue,
                Some(done) => break done,
            }
        };
        match outcome {
            Ok(()) if have == d.size => {
                complete = true;
                break;
            }
            Ok(()) => last = format!("the body ended after {} of {} bytes", have, d.size),
            Err(e) => last = e,
        }
    }
    if !complete {
        return Err(RegistryError::Transport {
            host: ep.registry.clone(),
            detail: format!("downloading {}: {}", what, last),
            attempts: client.settings.attempts,
        });
    }
    let got = Digest::from_hasher(hasher);
    if got != d.digest {
        return Err(RegistryError::DigestMismatch {
            what,
            expected: d.digest.to_string(),
            got: got.to_string(),
        });
    }
    file.flush().map_err(io)?;
    blobs.commit(&tmp, file, &d.digest)?;
    guard.0 = None;
    if super::client::is_layer_media_type(&d.media_type) {
        client.count_layer_download(d.size);
    }
    Ok(true)
}

/// Download `blobs` with up to [`PARALLEL_BLOBS`] at once; returns how many were new.
pub fn fetch_blobs(
    client: &Client,
    ep: &Endpoint,
    store: &BlobStore,
    repository: &str,
    blobs: &[Descriptor],
) -> Result<usize, RegistryError> {
    let fetched = AtomicUsize::new(0);
    super::for_each_parallel(blobs, PARALLEL_BLOBS, |d| {
        if fetch_blob(client, ep, store, repository, d)? {
            fetched.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })?;
    Ok(fetched.into_inner())
}

/// The config and layers an image manifest references.
pub fn manifest_blobs(manifest: &Value, display: &str) -> Result<Vec<Descriptor>, RegistryError> {
    crate::oci::image::check_manifest_bounds(manifest)
        .map_err(|e| RegistryError::Protocol(format!("{}: {}", display, e)))?;
    let mut out = vec![descriptor(&manifest["config"], display)?];
    for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
        out.push(descriptor(&l, display)?);
    }
    Ok(out)
}

/// What a pull did.
pub struct Pulled {
    pub image: StoredImage,
    /// The index the image was chosen from, stored byte for byte (its other platforms'
    /// manifests are not fetched): the name then stands for the index, as at the registry.
    pub index: Option<Digest>,
    pub blobs_fetched: usize,
    pub blobs_total: usize,
    /// Layers left at the registry until their bytes are needed.
    pub blobs_later: usize,
    /// Attestations the registry lists as the image's referrers (fetched by `builder pull`).
    pub attestations: Vec<image::StoredAttestation>,
}

/// What a pull does with an image's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// Download them (`builder pull`).
    Download,
    /// Remember where they are, and download each when its bytes are first needed (a
    /// build's base image: a build whose steps all hit never reads them).
    WhenNeeded,
}

/// Pull `reference` for `platform` into the blob store (naming it is the caller's). Mirrors
/// configured for the registry are tried first.
pub fn pull(
    client: &Client,
    local: &Local,
    reference: &Reference,
    platform: &Platform,
    layers: Layers,
) -> Result<Pulled, RegistryError> {
    let r = reference.clone().with_default_tag();
    let mirrors = client
        .settings
        .mirrors
        .get(&r.registry)
        .cloned()
        .unwrap_or_default();
    let mut mirror_failures = Vec::new();
    for mirror in &mirrors {
        match pull_from(client, local, mirror, &r, platform, layers) {
            Ok(p) => return Ok(p),
            Err(e) => mirror_failures.push(format!("mirror {}: {}", mirror, e)),
        }
    }
    pull_from(client, local, &r.registry, &r, platform, layers).map_err(|e| {
        if mirror_failures.is_empty() {
            e
        } else {
            RegistryError::Protocol(format!("{} (after {})", e, mirror_failures.join("; ")))
        }
    })
}

fn pull_from(
    client: &Client,
    local: &Local,
    registry: &str,
    r: &Reference,
    platform: &Platform,
    layers: Layers,
) -> Result<Pulled, RegistryError> {
    let display = r.familiar();
    let ep = client.endpoint(registry)?;
    // A tag and a digest together: resolve the tag, then insist it still names the digest.
    let asked = match (&r.tag, &r.digest) {
        (Some(t), Some(_)) => t.clone(),
        _ => r.manifest_ref(),
    };
    let mut top = get_manifest(client, &ep, &r.repository, &asked, &display)?;
    if let (Some(_), Some(pinned)) = (&r.tag, &r.digest) {
        if &top.digest != pinned {
            return Err(RegistryError::DigestMismatch {
                what: format!("{} (the tag now names another image)", display),
                expected: pinned.to_string(),
                got: top.digest.to_string(),
            });
        }
    }
    let mut index_bytes = None;
    if is_index(&top.media_type) {
        index_bytes = Some(top.bytes.clone());
        let index: Value = serde_json::from_slice(&top.bytes)
            .map_err(|e| RegistryError::Protocol(format!("{}: {}", display, e)))?;
        let chosen = choose_platform(&index, platform, &display)?;
        top = get_manifest(
            client,
            &ep,
            &r.repository,
            &chosen.digest.to_string(),
            &display,
        )?;
        if is_index(&top.media_type) {
            return Err(RegistryError::Protocol(format!(
                "{}: the index for {} points at another index",
                display,
                platform.spec()
            )));
        }
    }
    if top.media_type != MEDIA_MANIFEST && top.media_type != DOCKER_MANIFEST {
        return Err(RegistryError::Protocol(format!(
            "{}: unsupported manifest media type {}",
            display, top.media_type
        )));
    }
    let manifest: Value = serde_json::from_slice(&top.bytes)
        .map_err(|e| RegistryError::Protocol(format!("{}: {}", display, e)))?;
    let blobs = manifest_blobs(&manifest, &display)?;
    let (now, later): (Vec<Descriptor>, Vec<Descriptor>) = blobs.iter().cloned().partition(|b| {
        layers == Layers::Download
            || !super::client::is_layer_media_type(&b.media_type)
            || local.blobs.contains(&b.digest)
    });
    let fetched = fetch_blobs(client, &ep, local.blobs, &r.repository, &now)?;
    for b in &later {
        local.origins.remember_lazy(b, registry, &r.repository);
    }
    for b in &blobs {
        local.origins.record(&b.digest, &r.registry, &r.repository);
    }
    let stored = local.blobs.put(&top.bytes)?;
    let image = image::load(local.blobs, &stored)?;
    let index = match &index_bytes {
        Some(b) => Some(local.blobs.put(b)?),
        None => None,
    };
    // The image's attestations come along (they are small, and a push of the name then
    // sends the index whole); other platforms' stay at the registry. An attestation that
    // cannot be fetched costs the pull nothing but a notice.
    if let Some(b) = &index_bytes {
        for (att, subject) in image::attestation_entries(b) {
            if subject != image.manifest_digest || local.blobs.contains(&att) {
                continue;
            }
            if let Err(e) = fetch_attestation(client, &ep, local, &r.repository, &att, &display) {
                client.notice(&format!(
                    "{}: the attestations of {} were not fetched: {}",
                    display, subject, e
                ));
            }
        }
    }
    // `builder pull` brings the attestations a registry lists as the image's referrers too.
    let mut attestations = Vec::new();
    if layers == Layers::Download {
        match fetch_referred_attestations(
            client,
            local,
            registry,
            &r.repository,
            &image.manifest_digest,
            &display,
        ) {
            Ok(found) => attestations = found,
            Err(e) => client.notice(&format!(
                "{}: the referrers of {} were not fetched: {}",
                display, image.manifest_digest, e
            )),
        }
    }
    let (os, arch) = (
        image.state.config.os().to_string(),
        image.state.config.architecture().to_string(),
    );
    if os != platform.os || arch != platform.architecture {
        client.notice(&format!(
            "{} is a {}/{} image, not {} (the registry offers no other platform)",
            display,
            os,
            arch,
            platform.spec()
        ));
    }
    Ok(Pulled {
        image,
        index,
        blobs_fetched: fetched,
        blobs_total: blobs.len(),
        blobs_later: later.len(),
        attestations,
    })
}

/// The tag that stands in for the referrers API where a registry has none: the referrers
/// index of `subject` is kept under `<algorithm>-<hex>` (the distribution spec's fallback).
pub fn referrers_tag(subject: &Digest) -> String {
    subject.to_string().replacen(':', "-", 1)
}

/// What lists the referrers of a manifest at a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferrersSource {
    /// The referrers API (`GET /v2/<name>/referrers/<digest>`).
    Api,
    /// The fallback tag ([`referrers_tag`]), for registries without the API.
    Tag,
}

/// The referrers of `subject` in `repository`: from the referrers API, else (where the
/// registry has none) from the fallback tag; none when neither lists any. Returns the
/// referrers index's entries and where they came from.
pub fn list_referrers(
    client: &Client,
    ep: &Endpoint,
    repository: &str,
    subject: &Digest,
    display: &str,
) -> Result<(Vec<Value>, ReferrersSource), RegistryError> {
    let target = format!("/v2/{}/referrers/{}", repository, subject);
    let response = client.send(
        ep,
        "GET",
        &target,
        &[("Accept", MEDIA_INDEX.to_string())],
        Body::Empty,
        &[scope(repository, "pull")],
    )?;
    if response.status() == 200 {
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MANIFEST_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Protocol(format!("{}: referrers: {}", display, e)))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::Protocol(format!(
                "{}: the referrers index is not JSON: {}",
                display, e
            ))
        })?;
        return Ok((
            v["manifests"].as_array().cloned().unwrap_or_default(),
            ReferrersSource::Api,
        ));
    }
    match get_manifest(client, ep, repository, &referrers_tag(subject), display) {
        Ok(f) => {
            let v: Value = serde_json::from_slice(&f.bytes).map_err(|e| {
                RegistryError::Protocol(format!("{}: referrers tag: {}", display, e))
            })?;
            Ok((
                v["manifests"].as_array().cloned().unwrap_or_default(),
                ReferrersSource::Tag,
            ))
        }
        Err(RegistryError::Status { status: 404, .. }) | Err(RegistryError::NotFound { .. }) => {
            Ok((Vec::new(), ReferrersSource::Tag))
        }
        Err(e) => Err(e),
    }
}

/// Fetch the attestations the registry lists as referrers of `image` in `repository`
/// (each manifest and its statements, verified), as stored attestations about it. A
/// referrer that says it is about another image is refused.
pub fn fetch_referred_attestations(
    client: &Client,
    local: &Local,
    registry: &str,
    repository: &str,
    image: &Digest,
    display: &str,
) -> Result<Vec<image::StoredAttestation>, RegistryError> {
    let ep = client.endpoint(registry)?;
    let (entries, _) = list_referrers(client, &ep, repository, image, display)?;
    let mut out = Vec::new();
    for e in entries {
        let is_attestation = e["artifactType"]
            .as_str()
            .is_some_and(image::is_referrer_type)
            || e["annotations"][image::REFERENCE_TYPE].as_str()
                == Some(image::ATTESTATION_MANIFEST);
        if !is_attestation {
            continue;
        }
        let d = descriptor(&e, display)?;
        if !local.blobs.contains(&d.digest) {
            fetch_attestation(client, &ep, local, repository, &d.digest, display)?;
        }
        out.push(image::load_attestation(local.blobs, &d.digest, image)?);
    }
    Ok(out)
}

/// Fetch one attestation manifest and what it references.
fn fetch_attestation(
    client: &Client,
    ep: &Endpoint,
    local: &Local,
    repository: &str,
    digest: &Digest,
    display: &str,
) -> Result<(), RegistryError> {
    let got = get_manifest(client, ep, repository, &digest.to_string(), display)?;
    let manifest: Value = serde_json::from_slice(&got.bytes)
        .map_err(|e| RegistryError::Protocol(format!("{}: {}", display, e)))?;
    let blobs = manifest_blobs(&manifest, display)?;
    fetch_blobs(client, ep, local.blobs, repository, &blobs)?;
    local.blobs.put(&got.bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out 8 KiB per read, then fails (or ends) after `total` bytes.
    struct Trickle {
        left: usize,
        fails: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return match self.fails {
                    true => Err(std::io::Error::other("connection reset")),
                    false => Ok(0),
                };
            }
            let n = buf.len().min(8192).min(self.left);
            buf[..n].fill(7);
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_buffer_is_filled_from_small_reads_and_the_bytes_before_a_failure_count() {
        let mut buf = vec![0u8; 64 << 10];
        let mut whole = Trickle {
            left: 100 << 10,
            fails: false,
        };
        assert_eq!(fill_from(&mut whole, &mut buf), (64 << 10, None));
        assert_eq!(fill_from(&mut whole, &mut buf), (36 << 10, Some(Ok(()))));
        // A resumed download starts after the bytes read before the connection broke.
        let mut broken = Trickle {
            left: 20000,
            fails: true,
        };
        let (n, end) = fill_from(&mut broken, &mut buf);
        assert_eq!(n, 20000);
        assert!(matches!(end, Some(Err(e)) if e.contains("reset")));
    }

    #[test]
    fn descriptors_without_a_real_size_are_refused() {
        let d = Digest::of(b"layer bytes").to_string();
        let empty = Digest::of(b"").to_string();
        assert!(descriptor(&serde_json::json!({"digest": d, "size": 11}), "m").is_ok());
        let zero = descriptor(&serde_json::json!({"digest": d, "size": 0}), "m");
        assert!(zero.unwrap_err().to_string().contains("size 0"));
        let missing = descriptor(&serde_json::json!({"digest": d}), "m");
        assert!(missing.unwrap_err().to_string().contains("no size"));
        assert!(descriptor(&serde_json::json!({"digest": empty, "size": 0}), "m").is_ok());
    }
}
