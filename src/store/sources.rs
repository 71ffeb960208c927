//! Where base images come from: `scratch`, a store name, `oci:DIR[:TAG]`,
//! `oci-archive:FILE[:TAG]` and `docker-archive:FILE` (skopeo's transport spellings). Foreign
//! images are copied into the store blob by blob, each verified against its digest.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Store, StoreError};
use crate::oci::digest::Digest;
use crate::oci::image::{self, LayerRef, StoredImage, DOCKER_MANIFEST_LIST, MEDIA_INDEX};
use crate::oci::platform::Platform;
use crate::oci::root::Root;
use crate::oci::unpack::{self, UnpackOptions};
use crate::registry::{self, Client, PullPolicy, Reference, RegistryError};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Store(String),
    OciDir { dir: PathBuf, tag: Option<String> },
    OciArchive { file: PathBuf, tag: Option<String> },
    DockerArchive { file: PathBuf },
}

/// Split `path[:tag]`, where a tag never holds `/`, or `path@sha256:…` (the tag is then
/// the digest).
fn path_and_tag(s: &str) -> (PathBuf, Option<String>) {
    if let Some((p, d)) = s.rsplit_once('@') {
        if !p.is_empty() && d.parse::<Digest>().is_ok() {
            return (PathBuf::from(p), Some(d.to_string()));
        }
    }
    match s.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !t.is_empty() && !p.is_empty() => {
            (PathBuf::from(p), Some(t.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

impl ImageSource {
    pub fn parse(s: &str) -> ImageSource {
        if let Some(r) = s.strip_prefix("oci:") {
            let (dir, tag) = path_and_tag(r);
            ImageSource::OciDir { dir, tag }
        } else if let Some(r) = s.strip_prefix("oci-archive:") {
            let (file, tag) = path_and_tag(r);
            ImageSource::OciArchive { file, tag }
        } else if let Some(r) = s.strip_prefix("docker-archive:") {
            ImageSource::DockerArchive {
                file: path_and_tag(r).0,
            }
        } else {
            ImageSource::Store(s.to_string())
        }
    }
}

fn damaged(path: &Path, msg: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// How a named image is found: the pull policy, the registry client and where to say what
/// was pulled.
pub struct Pulling<'a> {
    pub policy: PullPolicy,
    pub client: &'a Client,
    pub log: &'a (dyn Fn(&str) + Sync),
    pub layers: registry::pull::Layers,
}

/// Bring the image `reference` into the store (if foreign) and load it.
pub fn fetch(
    store: &Store,
    reference: &str,
    platform: &Platform,
    pulling: &Pulling,
) -> Result<StoredImage, StoreError> {
    match ImageSource::parse(reference) {
        ImageSource::Store(name) => named(store, &name, platform, pulling),
        ImageSource::OciDir { dir, tag } => import_oci_dir(store, &dir, tag.as_deref(), platform),
        ImageSource::OciArchive { file, tag } => {
            let tmp = unpack_archive(store, &file)?;
            import_oci_dir(store, tmp.path(), tag.as_deref(), platform)
        }
        ImageSource::DockerArchive { file } => {
            let tmp = unpack_archive(store, &file)?;
            import_docker_dir(store, tmp.path(), &file)
        }
    }
}

/// An image archive unpacked into a scratch directory of the store.
fn unpack_archive(store: &Store, file: &Path) -> Result<tempfile::TempDir, StoreError> {
    let tmp = store.scratch_dir("archive-")?;
    unpack::unpack_layer(
        file,
        &file.display().to_string(),
        tmp.path(),
        UnpackOptions::default(),
    )
    .map_err(|e| damaged(file, e.to_string()))?;
    Ok(tmp)
}

/// A pull into the store that failed in the registry or in naming the image.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Pull `reference` into `store` and name it there; returns the pull and the name
/// (`alpine:3`, `127.0.0.1:5000/base:latest`). The one place pulls meet store names.
pub fn pull_named(
    client: &registry::Client,
    store: &Store,
    reference: &Reference,
    platform: &Platform,
    layers: registry::pull::Layers,
) -> Result<(registry::pull::Pulled, String), PullError> {
    let p = registry::pull::pull(client, &store.local(), reference, platform, layers)?;
    store.keep_attestations(&p.image, &p.attestations)?;
    let name = store.tag(
        &reference.clone().with_default_tag().familiar(),
        p.index.as_ref().unwrap_or(&p.image.manifest_digest),
    )?;
    Ok((p, name))
}

/// A named image: from the store, or pulled from its registry, as the policy says.
fn named(
    store: &Store,
    name: &str,
    platform: &Platform,
    pulling: &Pulling,
) -> Result<StoredImage, StoreError> {
    let reference = Reference::parse(name)
        .map_err(|e| StoreError::BadName(name.to_string(), e.reason))?
        .with_default_tag();
    let familiar = reference.familiar();
    let local = || match store.image_for(&familiar, &platform.spec()) {
        Err(StoreError::NotFound(_)) if reference.tag.is_none() => {
            // A bare digest names the stored manifest itself.
            match &reference.digest {
                Some(d) if store.blobs.contains(d) => {
                    Ok(image::load_for(&store.blobs, d, &platform.spec())?)
                }
                _ => Err(StoreError::NotFound(familiar.clone())),
            }
        }
        other => other,
    };
    let pull = || {
        (pulling.log)(&format!("pulling {}", reference));
        match pull_named(pulling.client, store, &reference, platform, pulling.layers) {
            Ok((p, name)) => {
                let later = match p.blobs_later {
                    0 => String::new(),
                    n => format!("; {} layers fetched when needed", n),
                };
                (pulling.log)(&format!(
                    "pulled {} as {} ({}; {} of {} blobs downloaded{})",
                    reference, name, p.image.manifest_digest, p.blobs_fetched, p.blobs_total, later
                ));
                Ok(p.image)
            }
            Err(PullError::Store(e)) => Err(e),
            Err(PullError::Registry(RegistryError::Blob(e))) => Err(StoreError::Blob(e)),
            Err(PullError::Registry(RegistryError::Image(e))) => Err(StoreError::Image(e)),
            Err(PullError::Registry(e)) => Err(StoreError::Pull(familiar.clone(), Box::new(e))),
        }
    };
    match pulling.policy {
        PullPolicy::Never => local().map_err(|e| match e {
            StoreError::NotFound(n) => {
                StoreError::NotFound(format!("{} (and --pull never forbids pulling it)", n))
            }
            e => e,
        }),
        PullPolicy::Missing => match local() {
            Err(StoreError::NotFound(_)) => pull(),
            other => other,
        },
        PullPolicy::Always => pull(),
    }
}

/// Copy the blob `d` from `dir/blobs/sha256` into the store, verifying it.
fn copy_blob(store: &Store, dir: &Path, d: &Digest) -> Result<(), StoreError> {
    if store.blobs.contains(d) {
        return Ok(());
    }
    let p = dir.join("blobs/sha256").join(d.hex());
    let mut f =
        fs::File::open(&p).map_err(|e| damaged(&p, format!("blob {} is missing: {}", d, e)))?;
    let (got, _) = store.blobs.put_reader(&mut f)?;
    if &got != d {
        return Err(damaged(
            &p,
            format!("blob content hashes to {}, not {}", got, d),
        ));
    }
    Ok(())
}

fn digest_field(v: &Value, path: &Path) -> Result<Digest, StoreError> {
    v["digest"]
        .as_str()
        .unwrap_or("")
        .parse()
        .map_err(|e: crate::oci::digest::BadDigest| damaged(path, e.to_string()))
}

fn read_json(p: &Path) -> Result<Value, StoreError> {
    let limit = image::MAX_MANIFEST_BYTES;
    let size = fs::metadata(p)
        .map_err(|e| damaged(p, e.to_string()))?
        .len();
    if size > limit {
        return Err(damaged(
            p,
            format!("{} bytes, over the limit of {} bytes", size, limit),
        ));
    }
    let b = fs::read(p).map_err(|e| damaged(p, e.to_string()))?;
    serde_json::from_slice(&b).map_err(|e| damaged(p, format!("not valid JSON: {}", e)))
}

/// Import the image tagged `tag` (or the only one) from an OCI layout directory.
pub fn import_oci_dir(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<StoredImage, StoreError> {
    let index_path = dir.join("index.json");
    let index = read_json(&index_path)?;
    let chosen = layout_entry(&index_path, &index, tag)?;
    let mut desc = chosen;
    // Where attestations about the image may be listed: index.json itself (as referrers)
    // and any index on the way to it (BuildKit's layout).
    let mut listings = vec![index];
    // An index (multi-platform) points at per-platform manifests: take ours.
    for _ in 0..4 {
        let mt = desc["mediaType"].as_str().unwrap_or("");
        if mt != MEDIA_INDEX && mt != DOCKER_MANIFEST_LIST {
            break;
        }
        let d = digest_field(&desc, &index_path)?;
        copy_blob(store, dir, &d)?;
        let nested: Value = serde_json::from_slice(&store.blobs.get(&d)?)
            .map_err(|e| damaged(&index_path, e.to_string()))?;
        let list = nested["manifests"].as_array().cloned().unwrap_or_default();
        listings.push(nested);
        desc = list
            .iter()
            .find(|m| {
                m["platform"]["os"] == platform.os.as_str()
                    && m["platform"]["architecture"] == platform.architecture.as_str()
            })
            .cloned()
            .ok_or_else(|| {
                damaged(
                    &index_path,
                    format!("no image for platform {}", platform.spec()),
                )
            })?;
    }
    let md = digest_field(&desc, &index_path)?;
    copy_manifest(store, dir, &md)?;
    let img = image::load(&store.blobs, &md)?;
    let mut attestations = Vec::new();
    for listing in &listings {
        for (m, subject) in image::attestation_entries_of(listing) {
            if subject != md {
                continue;
            }
            // An attestation that cannot be read is left out: it is not the image.
            if let Ok(a) = import_attestation(store, dir, &m, &md) {
                attestations.push(a);
            }
        }
    }
    store.keep_attestations(&img, &attestations)?;
    Ok(img)
}

/// The index.json entry `tag` names, else its only image (attestations listed beside the
/// images are not images).
fn layout_entry(index_path: &Path, index: &Value, tag: Option<&str>) -> Result<Value, StoreError> {
    let images: Vec<&Value> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["annotations"][image::REFERENCE_TYPE].is_null())
        .collect();
    match tag {
        Some(t) if t.parse::<Digest>().is_ok() => images
            .iter()
            .find(|m| m["digest"].as_str() == Some(t))
            .ok_or_else(|| damaged(index_path, format!("no image {} listed", t))),
        Some(t) => images
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t))
            .ok_or_else(|| damaged(index_path, format!("no image tagged {:?}", t))),
        None if images.len() == 1 => Ok(&images[0]),
        None => Err(damaged(
            index_path,
            format!("holds {} images; name one as oci:DIR:TAG", images.len()),
        )),
    }
    .map(|m| (*m).clone())
}

/// Copy the manifest `d` from a layout into the store, with its config and layers (each
/// verified); returns the manifest.
fn copy_manifest(store: &Store, dir: &Path, d: &Digest) -> Result<Value, StoreError> {
    copy_blob(store, dir, d)?;
    let manifest: Value =
        serde_json::from_slice(&store.blobs.get(d)?).map_err(|e| damaged(dir, e.to_string()))?;
    image::check_manifest_bounds(&manifest).map_err(|e| damaged(dir, e))?;
    copy_blob(store, dir, &digest_field(&manifest["config"], dir)?)?;
    for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
        copy_blob(store, dir, &digest_field(&l, dir)?)?;
    }
    Ok(manifest)
}

/// Copy an attestation manifest about `subject`, and its statements, from a layout.
fn import_attestation(
    store: &Store,
    dir: &Path,
    m: &Digest,
    subject: &Digest,
) -> Result<image::StoredAttestation, StoreError> {
    copy_manifest(store, dir, m)?;
    Ok(image::load_attestation(&store.blobs, m, subject)?)
}

/// An image fetched from wherever a reference says it is, with its attestations: the
/// stored image, and the digest the reference names (its index when it names one).
pub struct Placed {
    pub top: Digest,
    pub images: Vec<StoredImage>,
}

/// Bring what `reference` names into the store, with the attestations about it, without
/// naming it: a store name (as stored), `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
/// `docker-archive:FILE`, or a registry reference (manifests, configs and attestations
/// fetched; layers left at the registry until something reads them). `platform` picks
/// one image of an index; `None` takes every platform it lists, in its order.
pub fn fetch_anywhere(
    store: &Store,
    reference: &str,
    platform: Option<&Platform>,
    client: &Client,
) -> Result<Placed, StoreError> {
    let host = Platform::host();
    let wanted = |listed: Vec<String>| -> Vec<Platform> {
        match platform {
            Some(p) => vec![p.clone()],
            None if listed.is_empty() => vec![host.clone()],
            None => listed.iter().filter_map(|s| Platform::parse(s)).collect(),
        }
    };
    let source = ImageSource::parse(reference);
    if let ImageSource::Store(name) = &source {
        if let Ok(top) = store.resolve(name) {
            let images = match platform {
                Some(p) => vec![store.image_for(name, &p.spec())?],
                None => image::load_all(&store.blobs, &top)?.0,
            };
            return Ok(Placed { top, images });
        }
    }
    match source {
        ImageSource::Store(name) => {
            let r = Reference::parse(&name)
                .map_err(|e| StoreError::BadName(name.clone(), e.reason))?
                .with_default_tag();
            let pull_err = |e: RegistryError| StoreError::Pull(r.familiar(), Box::new(e));
            let ep = client.endpoint(&r.registry).map_err(pull_err)?;
            let top = registry::pull::get_manifest(
                client,
                &ep,
                &r.repository,
                &r.manifest_ref(),
                &r.familiar(),
            )
            .map_err(pull_err)?;
            let listed = image::index_entries(&top.bytes)
                .map(|e| e.into_iter().map(|(_, p)| p).collect())
                .unwrap_or_default();
            let pinned = Reference {
                digest: Some(top.digest.clone()),
                ..r.clone()
            };
            let mut images = Vec::new();
            for p in wanted(listed) {
                let pulled = registry::pull::pull(
                    client,
                    &store.local(),
                    &pinned,
                    &p,
                    registry::pull::Layers::WhenNeeded,
                )
                .map_err(pull_err)?;
                let attestations = registry::pull::fetch_referred_attestations(
                    client,
                    &store.local(),
                    &r.registry,
                    &r.repository,
                    &pulled.image.manifest_digest,
                    &r.familiar(),
                )
                .map_err(pull_err)?;
                store.keep_attestations(&pulled.image, &attestations)?;
                images.push(pulled.image);
            }
            Ok(Placed {
                top: top.digest,
                images,
            })
        }
        ImageSource::OciDir { dir, tag } => from_layout(store, &dir, tag.as_deref(), &wanted),
        ImageSource::OciArchive { file, tag } => {
            let tmp = unpack_archive(store, &file)?;
            from_layout(store, tmp.path(), tag.as_deref(), &wanted)
        }
        ImageSource::DockerArchive { file } => {
            let tmp = unpack_archive(store, &file)?;
            let img = import_docker_dir(store, tmp.path(), &file)?;
            Ok(Placed {
                top: img.manifest_digest.clone(),
                images: vec![img],
            })
        }
    }
}

/// The platforms `wanted` picks of the image a layout's `tag` names, imported.
fn from_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    wanted: &dyn Fn(Vec<String>) -> Vec<Platform>,
) -> Result<Placed, StoreError> {
    let index_path = dir.join("index.json");
    let chosen = layout_entry(&index_path, &read_json(&index_path)?, tag)?;
    let top = digest_field(&chosen, &index_path)?;
    copy_blob(store, dir, &top)?;
    let listed = image::index_entries(&store.blobs.get(&top)?)
        .map(|e| e.into_iter().map(|(_, p)| p).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for p in wanted(listed) {
        out.push(import_oci_dir(store, dir, tag, &p)?);
    }
    Ok(Placed { top, images: out })
}

/// Import a `docker save` directory: manifest.json, config JSON and layer tars.
fn import_docker_dir(store: &Store, dir: &Path, origin: &Path) -> Result<StoredImage, StoreError> {
    let mpath = dir.join("manifest.json");
    let m = read_json(&mpath)?;
    let entry = m
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| damaged(origin, "manifest.json lists no image"))?;
    let config_rel = entry["Config"]
        .as_str()
        .ok_or_else(|| damaged(origin, "manifest.json has no Config"))?;
    // Everything the archive names is opened inside it, whatever links it holds.
    let archive = Root::open(dir).map_err(|e| damaged(dir, e.to_string()))?;
    let config_path = dir.join(config_rel);
    let config_bytes = archive
        .read_regular(Path::new(config_rel), image::MAX_CONFIG_BYTES)
        .map_err(|e| damaged(origin, e.to_string()))?
        .ok_or_else(|| damaged(&config_path, "not in the archive"))?;
    let cv: Value =
        serde_json::from_slice(&config_bytes).map_err(|e| damaged(&config_path, e.to_string()))?;
    let diff_ids = image::diff_ids_of(&cv);
    let mut layers = Vec::new();
    for (i, l) in entry["Layers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let rel = l.as_str().unwrap_or("");
        let p = dir.join(rel);
        let mut f = archive
            .open_at(
                Path::new(rel),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            )
            .map(fs::File::from)
            .map_err(|e| damaged(&p, e.to_string()))?;
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return Err(damaged(&p, "a layer of the archive is not a regular file"));
        }
        let (digest, size) = store.blobs.put_reader(&mut f)?;
        let media_type = layer_media_type(&p);
        let diff_id: Digest = diff_ids
            .get(i)
            .ok_or_else(|| damaged(origin, "config has fewer diff_ids than layers"))?
            .parse()
            .map_err(|e: crate::oci::digest::BadDigest| damaged(origin, e.to_string()))?;
        layers.push(LayerRef {
            digest,
            diff_id,
            size,
            media_type: media_type.to_string(),
        });
    }
    let state = image::state_from_config(&config_bytes, layers, &origin.display().to_string())?;
    // Keep the original config bytes: the image's identity is its content.
    let config_digest = store.blobs.put(&config_bytes)?;
    let layer_values: Vec<Value> = state.layers.iter().map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size})).collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": image::MEDIA_MANIFEST,
        "config": {"mediaType": image::MEDIA_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layer_values,
    });
    let md = store.blobs.put(&image::canonical_json(&manifest))?;
    Ok(image::load(&store.blobs, &md)?)
}

/// The OCI layer media type of a layer file, by its magic bytes.
pub fn layer_media_type(p: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    if let Ok(mut f) = fs::File::open(p) {
        let _ = std::io::Read::read(&mut f, &mut magic);
    }
    match magic {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_transports() {
        assert_eq!(
            ImageSource::parse("oci:/tmp/x:v1"),
            ImageSource::OciDir {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageSource::parse("oci:./a/b"),
            ImageSource::OciDir {
                dir: "./a/b".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageSource::parse("docker-archive:/x.tar"),
            ImageSource::DockerArchive {
                file: "/x.tar".into()
            }
        );
        assert_eq!(
            ImageSource::parse("busybox:1"),
            ImageSource::Store("busybox:1".into())
        );
    }
}
