//! Exporters: where a built image goes. `oci:DIR[:TAG]` (an OCI image layout),
//! `oci-archive:FILE[:TAG]`, `docker-archive:FILE` (what `docker load` reads), `local:DIR`
//! (the root filesystem), and BuildKit's `type=...,dest=...` spellings of the same.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::oci::blobs::{write_atomic, BlobStore};
use crate::oci::digest::Digest;
use crate::oci::image::{canonical_json, StoredAttestation, StoredImage, StoredIndex};
use crate::oci::unpack::{self, UnpackOptions};

/// A requested output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    OciDir {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    DockerArchive {
        file: PathBuf,
    },
    /// `--load`, `type=docker` without a destination: into the docker daemon at
    /// `$DOCKER_HOST` (else /var/run/docker.sock), as buildx loads.
    DockerLoad,
    Local {
        dir: PathBuf,
    },
    /// `type=image,name=REF[,push=true]` and `type=registry,name=REF`: name the image in the
    /// store, and push it when asked. With `push-by-digest=true` the names are repositories
    /// the image is pushed to by its digest alone, with no tag (and not named in the store).
    Image {
        names: Vec<String>,
        push: bool,
        push_by_digest: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid output {0:?}: {1}")]
    Bad(String, String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Blob(#[from] crate::oci::blobs::BlobError),
    #[error("{0}")]
    Other(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn split_tag(s: &str) -> (PathBuf, Option<String>) {
    match s.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !t.is_empty() && !p.is_empty() => {
            (PathBuf::from(p), Some(t.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

impl Output {
    /// Parse `-o` values in skopeo style (`oci:DIR`) or BuildKit style (`type=oci,dest=DIR`).
    pub fn parse(s: &str) -> Result<Output, ExportError> {
        let bad = |m: &str| ExportError::Bad(s.to_string(), m.to_string());
        if s.starts_with("type=") || s.contains("dest=") {
            let mut kv = BTreeMap::new();
            for f in s.split(',') {
                let (k, v) = f
                    .split_once('=')
                    .ok_or_else(|| bad("expected key=value fields"))?;
                kv.insert(k.trim(), v.trim());
            }
            if let Some(kind @ ("image" | "registry")) = kv.get("type").copied() {
                let names: Vec<String> = kv
                    .get("name")
                    .map(|n| n.split(';').map(str::to_string).collect())
                    .unwrap_or_default();
                if names.is_empty() {
                    return Err(bad("name=REF is required"));
                }
                let push = match kv.get("push").copied() {
                    None => kind == "registry",
                    Some("true") => true,
                    Some("false") => false,
                    Some(v) => return Err(bad(&format!("push is true or false, not {:?}", v))),
                };
                let push_by_digest = match kv.get("push-by-digest").copied() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => {
                        return Err(bad(&format!(
                            "push-by-digest is true or false, not {:?}",
                            v
                        )))
                    }
                };
                if push_by_digest && !push {
                    return Err(bad("push-by-digest=true needs push=true"));
                }
                return Ok(Output::Image {
                    names,
                    push,
                    push_by_digest,
                });
            }
            if kv.get("type") == Some(&"docker") && !kv.contains_key("dest") {
                return Ok(Output::DockerLoad);
            }
            let dest = kv
                .get("dest")
                .map(PathBuf::from)
                .ok_or_else(|| bad("dest= is required"))?;
            let tag = kv.get("name").map(|s| s.to_string());
            return match kv.get("type").copied() {
                Some("oci") => {
                    if kv.get("tar") == Some(&"false") {
                        Ok(Output::OciDir { dir: dest, tag })
                    } else {
                        Ok(Output::OciArchive { file: dest, tag })
                    }
                }
                Some("docker") => Ok(Output::DockerArchive { file: dest }),
                Some("local") => Ok(Output::Local { dir: dest }),
                Some(t) => Err(bad(&format!(
                    "unknown type {:?} (oci, docker, local, image or registry)",
                    t
                ))),
                None => Err(bad("type= is required")),
            };
        }
        if let Some(r) = s.strip_prefix("oci:") {
            let (dir, tag) = split_tag(r);
            return Ok(Output::OciDir { dir, tag });
        }
        if let Some(r) = s.strip_prefix("oci-archive:") {
            let (file, tag) = split_tag(r);
            return Ok(Output::OciArchive { file, tag });
        }
        if let Some(r) = s.strip_prefix("docker-archive:") {
            return Ok(Output::DockerArchive {
                file: split_tag(r).0,
            });
        }
        if let Some(r) = s.strip_prefix("local:") {
            return Ok(Output::Local {
                dir: PathBuf::from(r),
            });
        }
        Err(bad("expected oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE, local:DIR or type=...,dest=..."))
    }
}

/// Export `image` to `out`. `names` are the `-t` tags (used by docker-archive's RepoTags);
/// `referrers`, its attestations, go beside it in an OCI layout.
pub fn export(
    blobs: &BlobStore,
    image: &StoredImage,
    names: &[String],
    out: &Output,
    scratch: &Path,
    referrers: &[StoredAttestation],
    descriptor_annotations: &BTreeMap<String, String>,
) -> Result<(), ExportError> {
    match out {
        Output::OciDir { .. } | Output::OciArchive { .. } => layout_output(
            blobs,
            out,
            names,
            scratch,
            referrers,
            (&image.manifest_digest, descriptor_annotations),
            |dir, tag| write_oci_layout(blobs, image, dir, tag),
        ),
        Output::DockerArchive { file } => {
            let tmp = tempfile::tempdir_in(scratch).map_err(io_at(scratch))?;
            write_oci_layout(blobs, image, tmp.path(), None)?;
            let layers: Vec<String> = image
                .state
                .layers
                .iter()
                .map(|l| format!("blobs/sha256/{}", l.digest.hex()))
                .collect();
            let manifest = json!([{
                "Config": format!("blobs/sha256/{}", image.config_digest.hex()),
                "RepoTags": names,
                "Layers": layers,
            }]);
            let extra = vec![("manifest.json".to_string(), canonical_json(&manifest))];
            tar_dir(tmp.path(), file, &extra)
        }
        Output::DockerLoad => {
            let tmp = tempfile::tempdir_in(scratch).map_err(io_at(scratch))?;
            let file = tmp.path().join("image.tar");
            let archive = Output::DockerArchive { file: file.clone() };
            export(
                blobs,
                image,
                names,
                &archive,
                scratch,
                referrers,
                &BTreeMap::new(),
            )?;
            load_into_docker(&file)
        }
        Output::Local { dir } => {
            fs::create_dir_all(dir).map_err(io_at(dir))?;
            let opts = UnpackOptions {
                devices: false,
                ownership: nix::unistd::geteuid().is_root(),
                overlay_format: false,
                metadata_only: false,
                user_xattrs: false,
                capability_xattr_only: false,
            };
            for l in &image.state.layers {
                unpack::unpack_verified(
                    &blobs.ensure(&l.digest)?,
                    &l.digest.to_string(),
                    dir,
                    opts,
                    &l.diff_id,
                )
                .map_err(|e| ExportError::Other(e.to_string()))?;
            }
            Ok(())
        }
        // Naming and pushing need the store and a registry client: the caller does them.
        Output::Image { .. } => Ok(()),
    }
}

/// Write an `oci:` or `oci-archive:` output: `write` lays the image out in a directory
/// under the output's tag (else the first name's), then `referrers` go beside it.
fn layout_output(
    blobs: &BlobStore,
    out: &Output,
    names: &[String],
    scratch: &Path,
    referrers: &[StoredAttestation],
    annotated: (&Digest, &BTreeMap<String, String>),
    write: impl Fn(&Path, Option<&str>) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let tag_of = |tag: &Option<String>| {
        tag.clone().or(names
            .first()
            .and_then(|n| n.rsplit_once(':').map(|x| x.1.to_string())))
    };
    let lay_out = |dir: &Path, tag: &Option<String>| -> Result<(), ExportError> {
        write(dir, tag_of(tag).as_deref())?;
        annotate_in_layout(dir, annotated.0, annotated.1)?;
        if referrers.is_empty() {
            return Ok(());
        }
        add_referrers_to_layout(blobs, referrers, dir)
    };
    match out {
        Output::OciDir { dir, tag } => lay_out(dir, tag),
        Output::OciArchive { file, tag } => {
            let tmp = tempfile::tempdir_in(scratch).map_err(io_at(scratch))?;
            lay_out(tmp.path(), tag)?;
            tar_dir(tmp.path(), file, &[])
        }
        _ => Ok(()),
    }
}

/// Add `annotations` to the layout's index.json entries for `digest` (`--annotation
/// index-descriptor:K=V`: the descriptor of what the build made, as BuildKit's OCI exporter
/// writes it).
fn annotate_in_layout(
    dir: &Path,
    digest: &Digest,
    annotations: &BTreeMap<String, String>,
) -> Result<(), ExportError> {
    if annotations.is_empty() {
        return Ok(());
    }
    let mut manifests = read_layout_index(&dir.join("index.json"));
    for m in manifests
        .iter_mut()
        .filter(|m| m["digest"].as_str() == Some(&digest.to_string()))
    {
        if !m["annotations"].is_object() {
            m["annotations"] = json!({});
        }
        for (k, v) in annotations {
            m["annotations"][k] = json!(v);
        }
    }
    write_layout_index(dir, manifests)
}

/// Copy a blob into a layout, unless the layout already has it (hardlink when possible).
pub fn place_blob(blobs: &BlobStore, dir: &Path, d: &Digest) -> Result<(), ExportError> {
    let dest = dir.join("blobs/sha256").join(d.hex());
    if dest.is_file() {
        return Ok(());
    }
    let src = blobs.ensure(d)?;
    if fs::hard_link(&src, &dest).is_ok() {
        return Ok(());
    }
    let parent = dest.parent().unwrap_or(dir);
    // Removed on every error path; a killed export's is removed by the next (see below).
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-{}-", d.hex(), std::process::id()))
        .tempfile_in(parent)
        .map_err(io_at(parent))?;
    let mut from = fs::File::open(&src).map_err(io_at(&src))?;
    // A write failure (a full disk) names the output, not the blob being read.
    io::copy(&mut from, tmp.as_file_mut()).map_err(io_at(&dest))?;
    tmp.as_file().sync_all().map_err(io_at(&dest))?;
    tmp.persist(&dest).map_err(|e| io_at(&dest)(e.error))?;
    Ok(())
}

/// Remove `.NAME.tmp-PID-…` files beside `file` that a killed export left (its pid is gone).
fn remove_stale_temps(parent: &Path, name: &str) {
    let prefix = format!(".{}.tmp-", name);
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if pid
            .parse::<i32>()
            .is_ok_and(|p| !crate::oci::blobs::process_exists(p))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Write (or add to) an OCI image layout at `dir`, naming the image `tag` in index.json.
pub fn write_oci_layout(
    blobs: &BlobStore,
    image: &StoredImage,
    dir: &Path,
    tag: Option<&str>,
) -> Result<(), ExportError> {
    place_image(blobs, image, dir)?;
    let desc =
        serde_json::to_value(crate::oci::image::platform_descriptor(image)).unwrap_or(Value::Null);
    name_in_layout(dir, desc, &image.manifest_digest, tag)
}

/// Write (or add to) an OCI image layout at `dir` holding `index` (its images, and its
/// attestation manifests as BuildKit writes them), named `tag`.
pub fn write_oci_index_layout(
    blobs: &BlobStore,
    index: &StoredIndex,
    dir: &Path,
    tag: Option<&str>,
) -> Result<(), ExportError> {
    for image in &index.images {
        place_image(blobs, image, dir)?;
    }
    for a in &index.attestations {
        place_attestation(blobs, a, dir)?;
    }
    place_blob(blobs, dir, &index.digest)?;
    let desc = serde_json::to_value(crate::oci::document::Descriptor::new(
        crate::oci::image::MEDIA_INDEX,
        index.digest.clone(),
        index.size,
    ))
    .unwrap_or(Value::Null);
    name_in_layout(dir, desc, &index.digest, tag)
}

/// Add `attestations` to the layout at `dir` as OCI 1.1 referrers of their images: their
/// blobs, and one untagged index.json entry each (with its `artifactType`, and BuildKit's
/// annotations naming the image it is about). Tags are untouched, so a tag still names the
/// image; entries about images no tag reaches any more are dropped.
pub fn add_referrers_to_layout(
    blobs: &BlobStore,
    attestations: &[StoredAttestation],
    dir: &Path,
) -> Result<(), ExportError> {
    for a in attestations {
        place_attestation(blobs, a, dir)?;
    }
    let index_path = dir.join("index.json");
    let mut manifests = read_layout_index(&index_path);
    let ours: Vec<String> = attestations
        .iter()
        .map(|a| a.manifest_digest.to_string())
        .collect();
    manifests.retain(|m| {
        m["annotations"][REF_NAME].is_string()
            || !ours
                .iter()
                .any(|d| m["digest"].as_str() == Some(d.as_str()))
    });
    for a in attestations {
        manifests.push(
            serde_json::to_value(crate::oci::image::referrer_descriptor(a)).unwrap_or(Value::Null),
        );
    }
    write_layout_index(dir, prune_referrers(dir, manifests))
}

/// The blobs of an attestation manifest (config, statements, manifest) in a layout.
fn place_attestation(
    blobs: &BlobStore,
    a: &StoredAttestation,
    dir: &Path,
) -> Result<(), ExportError> {
    place_blob(blobs, dir, &a.config_digest)?;
    for (l, _) in &a.statements {
        place_blob(blobs, dir, &l.digest)?;
    }
    place_blob(blobs, dir, &a.manifest_digest)
}

/// Whether an index.json entry is an untagged referrer (an attestation about an image).
fn is_layout_referrer(m: &Value) -> bool {
    !m["annotations"][REF_NAME].is_string()
        && m["annotations"][crate::oci::image::REFERENCE_DIGEST].is_string()
}

/// The layout's entries without referrers whose subject no image entry reaches (a tag that
/// moved to another image leaves its old image's attestations behind otherwise).
fn prune_referrers(dir: &Path, manifests: Vec<Value>) -> Vec<Value> {
    let mut reachable: Vec<String> = Vec::new();
    for m in manifests.iter().filter(|m| !is_layout_referrer(m)) {
        let Some(d) = m["digest"].as_str() else {
            continue;
        };
        reachable.push(d.to_string());
        let Ok(digest) = d.parse::<Digest>() else {
            continue;
        };
        let bytes = fs::read(dir.join("blobs/sha256").join(digest.hex())).unwrap_or_default();
        if let Some(entries) = crate::oci::image::index_entries(&bytes) {
            reachable.extend(entries.into_iter().map(|(d, _)| d.to_string()));
        }
    }
    manifests
        .into_iter()
        .filter(|m| {
            let about = m["annotations"][crate::oci::image::REFERENCE_DIGEST].as_str();
            !is_layout_referrer(m) || reachable.iter().any(|r| about == Some(r.as_str()))
        })
        .collect()
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn write_layout_index(dir: &Path, manifests: Vec<Value>) -> Result<(), ExportError> {
    // The images come first (a script reading `manifests[0]` finds the image), then their
    // referrers. oci-image-tool's `--ref name=TAG` filter removes entries from the list it
    // iterates, so it skips the entry after each one it removes: with two referrers or
    // more, one goes ahead of the images, which lets it find a tag beside two.
    let (referrers, images): (Vec<Value>, Vec<Value>) =
        manifests.into_iter().partition(is_layout_referrer);
    let ahead = usize::from(referrers.len() >= 2);
    let mut referrers = referrers.into_iter();
    let manifests: Vec<Value> = referrers
        .by_ref()
        .take(ahead)
        .collect::<Vec<_>>()
        .into_iter()
        .chain(images)
        .chain(referrers)
        .collect();
    let index_path = dir.join("index.json");
    let index = json!({"schemaVersion": 2, "mediaType": crate::oci::image::MEDIA_INDEX, "manifests": manifests});
    write_atomic(&index_path, &canonical_json(&index)).map_err(io_at(&index_path))
}

fn read_layout_index(index_path: &Path) -> Vec<Value> {
    match fs::read(index_path) {
        Ok(b) => serde_json::from_slice::<Value>(&b)
            .ok()
            .and_then(|v| v["manifests"].as_array().cloned())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The blobs of one image (config, layers, manifest) in a layout.
fn place_image(blobs: &BlobStore, image: &StoredImage, dir: &Path) -> Result<(), ExportError> {
    let bdir = dir.join("blobs/sha256");
    fs::create_dir_all(&bdir).map_err(io_at(&bdir))?;
    place_blob(blobs, dir, &image.config_digest)?;
    for l in &image.state.layers {
        place_blob(blobs, dir, &l.digest)?;
    }
    place_blob(blobs, dir, &image.manifest_digest)
}

/// Add `desc` to the layout's index.json (replacing what had the same tag, or the same
/// untagged digest), and write oci-layout.
fn name_in_layout(
    dir: &Path,
    mut desc: Value,
    digest: &Digest,
    tag: Option<&str>,
) -> Result<(), ExportError> {
    let layout = dir.join("oci-layout");
    write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_at(&layout))?;
    let index_path = dir.join("index.json");
    let mut manifests = read_layout_index(&index_path);
    manifests.retain(|m| match tag {
        Some(t) => m["annotations"][REF_NAME].as_str() != Some(t),
        None => {
            m["digest"].as_str() != Some(&digest.to_string())
                || m["annotations"][REF_NAME].is_string()
        }
    });
    if let Some(t) = tag {
        desc["annotations"] = json!({ REF_NAME: t });
    }
    manifests.push(desc);
    write_layout_index(dir, prune_referrers(dir, manifests))
}

/// What a build made, or a name stands for: one image, or an index of one per platform.
pub enum Built {
    Image(StoredImage),
    Index(StoredIndex),
}

impl Built {
    /// The digest a name for it points at.
    pub fn digest(&self) -> Digest {
        match self {
            Built::Image(i) => i.manifest_digest.clone(),
            Built::Index(i) => i.digest.clone(),
        }
    }

    /// Export it to `out` (see [`export`] and [`export_index`]). `attested`, the index
    /// holding its images with their attestations, gives a `local:` output the attestation
    /// files.
    pub fn export(
        &self,
        blobs: &BlobStore,
        names: &[String],
        out: &Output,
        scratch: &Path,
        attested: Option<&StoredIndex>,
        descriptor_annotations: &BTreeMap<String, String>,
    ) -> Result<(), ExportError> {
        // The attestations travel beside the image in a layout, as its referrers (unless
        // the build's name is BuildKit's index, which lists them itself).
        let referrers = match attested {
            Some(x) if x.digest != self.digest() => x.attestations.as_slice(),
            _ => &[],
        };
        match (self, out) {
            (Built::Image(i), Output::Local { dir }) => {
                export(blobs, i, names, out, scratch, &[], &BTreeMap::new())?;
                match attested {
                    Some(x) => write_attestation_files(blobs, x, i, dir),
                    None => Ok(()),
                }
            }
            (Built::Image(i), _) => export(
                blobs,
                i,
                names,
                out,
                scratch,
                referrers,
                descriptor_annotations,
            ),
            (Built::Index(i), _) => export_index(
                blobs,
                i,
                names,
                out,
                scratch,
                attested,
                referrers,
                descriptor_annotations,
            ),
        }
    }
}

/// Export a multi-platform build to `out`: OCI layouts and archives hold the index; a local
/// directory gets one subdirectory per platform (`linux_amd64/`, as BuildKit writes them); a
/// docker archive holds one image, so it refuses.
pub fn export_index(
    blobs: &BlobStore,
    index: &StoredIndex,
    names: &[String],
    out: &Output,
    scratch: &Path,
    attested: Option<&StoredIndex>,
    referrers: &[StoredAttestation],
    descriptor_annotations: &BTreeMap<String, String>,
) -> Result<(), ExportError> {
    match out {
        Output::OciDir { .. } | Output::OciArchive { .. } => layout_output(
            blobs,
            out,
            names,
            scratch,
            referrers,
            (&index.digest, descriptor_annotations),
            |dir, tag| write_oci_index_layout(blobs, index, dir, tag),
        ),
        Output::DockerArchive { .. } | Output::DockerLoad if index.images.len() == 1 => export(
            blobs,
            &index.images[0],
            names,
            out,
            scratch,
            &[],
            &BTreeMap::new(),
        ),
        Output::DockerLoad => Err(ExportError::Other(format!(
            "--load: docker holds one platform of an image, and this build made {}; build \
             with one --platform",
            index.images.len()
        ))),
        Output::DockerArchive { file } => Err(ExportError::Other(format!(
            "{}: a docker archive holds one platform, and this build made {}; build with one \
             --platform, or write an oci: or oci-archive: output",
            file.display(),
            index.images.len()
        ))),
        Output::Local { dir } => {
            for image in &index.images {
                let sub = if index.images.len() == 1 {
                    dir.clone()
                } else {
                    dir.join(crate::oci::image::platform_of(image).replace('/', "_"))
                };
                export(
                    blobs,
                    image,
                    names,
                    &Output::Local { dir: sub.clone() },
                    scratch,
                    &[],
                    &BTreeMap::new(),
                )?;
                write_attestation_files(blobs, attested.unwrap_or(index), image, &sub)?;
            }
            Ok(())
        }
        Output::Image { .. } => Ok(()),
    }
}

/// The docker daemon `--load` talks to: `$DOCKER_HOST` (a unix socket), else docker's
/// default socket.
fn docker_socket() -> Result<PathBuf, ExportError> {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => match h.strip_prefix("unix://") {
            Some(p) => Ok(PathBuf::from(p)),
            None => Err(ExportError::Other(format!(
                "--load: DOCKER_HOST={} is not a unix socket (unix:///PATH), which is all \
                 builder reaches",
                h
            ))),
        },
        _ => Ok(PathBuf::from("/var/run/docker.sock")),
    }
}

/// Load a docker archive into the daemon through the Engine API (`POST /images/load`),
/// as `docker load` does.
fn load_into_docker(archive: &Path) -> Result<(), ExportError> {
    use std::io::{Read, Write};
    let socket = docker_socket()?;
    let failed = |e: String| {
        ExportError::Other(format!(
            "--load: the docker daemon at {}: {}",
            socket.display(),
            e
        ))
    };
    let mut conn = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| failed(format!("{} (is dockerd running? set DOCKER_HOST)", e)))?;
    let size = fs::metadata(archive).map_err(io_at(archive))?.len();
    let head = format!(
        "POST /images/load?quiet=1 HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        size
    );
    conn.write_all(head.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let mut body = fs::File::open(archive).map_err(io_at(archive))?;
    io::copy(&mut body, &mut conn).map_err(|e| failed(e.to_string()))?;
    let mut answer = Vec::new();
    conn.take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(|e| failed(e.to_string()))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or("");
    let ok = status.split_whitespace().nth(1) == Some("200");
    // A failed load answers 200 too, with an error in its message stream.
    let error = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["error"].as_str().map(str::to_string));
    match (ok, error) {
        (true, None) => Ok(()),
        (_, Some(e)) => Err(failed(e)),
        (false, None) => Err(failed(status.to_string())),
    }
}

/// The file a local output gets for a statement of `predicate_type`, and whether it holds
/// the predicate alone (an SBOM file is the SPDX document that SPDX tools read) rather than
/// the whole statement.
fn attestation_file(predicate_type: &str) -> Option<(&'static str, bool)> {
    if predicate_type.starts_with("https://slsa.dev/provenance/") {
        Some(("provenance.json", false))
    } else if predicate_type == "https://spdx.dev/Document" {
        Some(("sbom.spdx.json", true))
    } else {
        None
    }
}

/// Write `image`'s attestations beside its exported root filesystem in `dir`.
fn write_attestation_files(
    blobs: &BlobStore,
    index: &StoredIndex,
    image: &StoredImage,
    dir: &Path,
) -> Result<(), ExportError> {
    for a in index
        .attestations
        .iter()
        .filter(|a| a.subject == image.manifest_digest)
    {
        for (layer, predicate_type) in &a.statements {
            let Some((name, predicate_only)) = attestation_file(predicate_type) else {
                continue;
            };
            let bytes = blobs.get(&layer.digest)?;
            let out = if predicate_only {
                let statement: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    ExportError::Other(format!("attestation {}: {}", layer.digest, e))
                })?;
                let mut b = serde_json::to_vec_pretty(&statement["predicate"])
                    .map_err(|e| ExportError::Other(e.to_string()))?;
                b.push(b'\n');
                b
            } else {
                bytes
            };
            let path = dir.join(name);
            write_atomic(&path, &out).map_err(io_at(&path))?;
        }
    }
    Ok(())
}

/// Write `dir` (plus extra in-memory files) as a deterministic tar at `file`.
fn tar_dir(dir: &Path, file: &Path, extra: &[(String, Vec<u8>)]) -> Result<(), ExportError> {
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_at(parent))?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temps(parent, &name);
    // Removed on every error path (NamedTempFile); renamed into place only when complete.
    let tmp_file = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-{}-", name, std::process::id()))
        .tempfile_in(parent)
        .map_err(io_at(parent))?;
    let tmp = tmp_file.path().to_path_buf();
    let f = tmp_file.reopen().map_err(io_at(&tmp))?;
    let mut b = tar::Builder::new(io::BufWriter::new(f));
    let mut paths = Vec::new();
    for e in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let e = e.map_err(|e| ExportError::Other(e.to_string()))?;
        paths.push(e.path().to_path_buf());
    }
    let header = |size: u64, dir: bool| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(size);
        h.set_mtime(0);
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h
    };
    for p in paths {
        let rel = p.strip_prefix(dir).unwrap_or(&p);
        let md = fs::metadata(&p).map_err(io_at(&p))?;
        if md.is_dir() {
            let mut h = header(0, true);
            b.append_data(&mut h, format!("{}/", rel.display()), io::empty())
                .map_err(io_at(file))?;
        } else {
            let mut h = header(md.len(), false);
            let f = fs::File::open(&p).map_err(io_at(&p))?;
            // Reading the layout is local; what fails here is writing the archive.
            b.append_data(&mut h, rel, f).map_err(io_at(file))?;
        }
    }
    for (name, data) in extra {
        let mut h = header(data.len() as u64, false);
        b.append_data(&mut h, name, data.as_slice())
            .map_err(io_at(file))?;
    }
    let mut w = b.into_inner().map_err(io_at(file))?;
    w.flush().map_err(io_at(file))?;
    w.get_ref().sync_all().map_err(io_at(file))?;
    drop(w);
    tmp_file.persist(file).map_err(|e| io_at(file)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_spellings() {
        assert_eq!(
            Output::parse("oci:/x:v1").unwrap(),
            Output::OciDir {
                dir: "/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Output::parse("type=oci,dest=/x,tar=false").unwrap(),
            Output::OciDir {
                dir: "/x".into(),
                tag: None
            }
        );
        assert_eq!(
            Output::parse("type=oci,dest=/x.tar").unwrap(),
            Output::OciArchive {
                file: "/x.tar".into(),
                tag: None
            }
        );
        assert_eq!(
            Output::parse("type=docker,dest=/d.tar").unwrap(),
            Output::DockerArchive {
                file: "/d.tar".into()
            }
        );
        assert_eq!(
            Output::parse("local:/r").unwrap(),
            Output::Local { dir: "/r".into() }
        );
        assert!(Output::parse("weird").is_err());
    }
}
