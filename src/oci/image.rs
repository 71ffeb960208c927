//! Image documents: the state a build carries from step to step ([`ImageState`]: config plus
//! layers), its serialisation to a config and a manifest blob in canonical JSON (sorted keys,
//! no whitespace), and reading images back. Docker's extensions inside `config`
//! (`Healthcheck`, `OnBuild`, `Shell`) are kept beside oci-spec's typed fields.

pub use super::document::canonical_json;
use super::document::{to_canonical, Descriptor, Index, Manifest, PlatformSpec};
use std::collections::BTreeMap;

use oci_spec::image::{Arch, Config, History, ImageConfiguration, ImageManifest, Os, RootFs};
use serde_json::{json, Value};

use super::blobs::{BlobError, BlobStore};
use super::digest::Digest;

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The PATH a step gets when its image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A layer as the manifest references it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
}

impl LayerRef {
    /// The JSON form the cache index, remote caches and build metadata share.
    pub fn to_json(&self) -> Value {
        json!({"digest": self.digest.to_string(), "diff_id": self.diff_id.to_string(), "size": self.size, "mediaType": self.media_type})
    }

    /// Read [`LayerRef::to_json`]'s form back; `None` when a field is missing or malformed.
    pub fn from_json(v: &Value) -> Option<LayerRef> {
        Some(LayerRef {
            digest: v["digest"].as_str()?.parse().ok()?,
            diff_id: v["diff_id"].as_str()?.parse().ok()?,
            size: v["size"].as_u64()?,
            media_type: v["mediaType"].as_str()?.to_string(),
        })
    }
}

/// Docker's fields of the runtime config that OCI's lacks, typed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DockerConfig {
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcheck: Option<HealthConfig>,
    #[serde(rename = "OnBuild", default, skip_serializing_if = "Option::is_none")]
    pub onbuild: Option<Vec<String>>,
    #[serde(rename = "Shell", default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// Docker's `ArgsEscaped`, which BuildKit sets whenever CMD is (deprecated in the OCI
    /// spec, kept for Docker's image format).
    #[serde(
        rename = "ArgsEscaped",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub args_escaped: Option<bool>,
}

/// Docker's `HealthConfig`: durations in nanoseconds, zero fields left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthConfig {
    #[serde(rename = "Test", default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    #[serde(rename = "Interval", default, skip_serializing_if = "is_zero")]
    pub interval: u64,
    #[serde(rename = "Timeout", default, skip_serializing_if = "is_zero")]
    pub timeout: u64,
    #[serde(rename = "StartPeriod", default, skip_serializing_if = "is_zero")]
    pub start_period: u64,
    #[serde(rename = "StartInterval", default, skip_serializing_if = "is_zero")]
    pub start_interval: u64,
    #[serde(rename = "Retries", default, skip_serializing_if = "is_zero")]
    pub retries: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Everything an image is, between steps of a build.
#[derive(Debug, Clone)]
pub struct ImageState {
    /// The config document but for its runtime part (always `None` here; see `runtime`).
    pub config: ImageConfiguration,
    /// The runtime part, kept apart so a step changes it in place instead of cloning it;
    /// its `Env` lives in `env`.
    runtime: Config,
    /// `Env` as ordered pairs (`None`: the config has no `Env`).
    env: Option<Vec<(String, String)>>,
    /// Where each name sits in `env`, so setting one costs the same however many there are.
    env_index: std::collections::HashMap<String, usize>,
    /// Docker's `config` fields that the OCI runtime config lacks.
    pub docker: DockerConfig,
    pub layers: Vec<LayerRef>,
    /// Top-level fields of the config document besides the image spec's: the inline cache
    /// ([`INLINE_CACHE_FIELD`]). A base image's are not carried into what is built on it.
    pub extra: BTreeMap<String, Value>,
}

/// The config field an image carries its own build's cache records in (`--cache-to
/// type=inline`), as BuildKit's `moby.buildkit.cache.v0`.
pub const INLINE_CACHE_FIELD: &str = "builder.cache.v0";

/// A stored image: its manifest and config, by digest.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    pub state: ImageState,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
}

fn invalid(what: impl Into<String>, msg: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        what: what.into(),
        msg: msg.into(),
    }
}

/// RFC 3339 UTC time of a unix timestamp, as image configs spell it.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        y,
        m,
        d,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl ImageState {
    /// An empty image (FROM scratch) for a platform.
    pub fn scratch(os: &str, arch: &str, variant: Option<&str>) -> ImageState {
        let mut config = ImageConfiguration::default();
        config.set_os(Os::from(os));
        config.set_architecture(Arch::from(arch));
        config.set_variant(variant.map(str::to_string));
        config.set_created(None);
        config.set_history(Vec::new());
        let mut rootfs = RootFs::default();
        rootfs.set_diff_ids(Vec::new());
        config.set_rootfs(rootfs);
        config.set_config(None);
        ImageState {
            config,
            runtime: Config::default(),
            env: None,
            env_index: Default::default(),
            docker: DockerConfig::default(),
            layers: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// The runtime config part, for reading.
    pub fn runtime(&self) -> &Config {
        &self.runtime
    }

    /// Change the runtime config with `f`.
    pub fn with_runtime(&mut self, f: impl FnOnce(&mut Config)) {
        f(&mut self.runtime);
    }

    /// The environment as ordered `(key, value)` pairs.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone().unwrap_or_default()
    }

    /// Set one environment variable, replacing an existing one in place.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let env = self.env.get_or_insert_with(Vec::new);
        match self.env_index.get(key) {
            Some(&i) => env[i].1 = value.to_string(),
            None => {
                self.env_index.insert(key.to_string(), env.len());
                env.push((key.to_string(), value.to_string()));
            }
        }
    }

    /// Record a step in the history (and the layer, when it made one).
    pub fn push_history(&mut self, created: &str, created_by: &str, layer: Option<LayerRef>) {
        let mut h = History::default();
        h.set_created(Some(created.to_string()));
        h.set_created_by(Some(created_by.to_string()));
        h.set_comment(Some("builder".to_string()));
        match layer {
            Some(l) => {
                self.config
                    .rootfs_mut()
                    .diff_ids_mut()
                    .push(l.diff_id.to_string());
                self.layers.push(l);
            }
            None => {
                h.set_empty_layer(Some(true));
            }
        }
        self.config.history_mut().push(h);
    }

    /// Put `layer` in place of every layer after the first `base_layers`: the history after
    /// the first `base_history` entries stays, each marked as making no layer, and one entry
    /// for `layer` follows (`--squash`).
    pub fn squash_since(
        &mut self,
        (base_layers, base_history): (usize, usize),
        layer: LayerRef,
        created: &str,
        created_by: &str,
    ) {
        self.layers.truncate(base_layers);
        self.config
            .rootfs_mut()
            .diff_ids_mut()
            .truncate(base_layers);
        for h in self.config.history_mut().iter_mut().skip(base_history) {
            h.set_empty_layer(Some(true));
        }
        self.push_history(created, created_by, Some(layer));
    }

    /// The runtime part of the config document, Docker's extras included.
    fn runtime_value(&self) -> Value {
        let mut runtime = serde_json::to_value(&self.runtime).unwrap_or_else(|_| json!({}));
        if let Some(r) = runtime.as_object_mut() {
            if let Some(env) = &self.env {
                let list: Vec<String> = env.iter().map(|(k, v)| format!("{}={}", k, v)).collect();
                r.insert("Env".into(), json!(list));
            }
            if let Ok(Value::Object(docker)) = serde_json::to_value(&self.docker) {
                r.extend(docker);
            }
        }
        runtime
    }

    /// The config document.
    pub fn config_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(&self.config).unwrap_or(Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("config".into(), self.runtime_value());
            for (k, x) in &self.extra {
                obj.insert(k.clone(), x.clone());
            }
        }
        canonical_json(&v)
    }

    /// What metadata instructions set (the runtime config, its extras and the author),
    /// without the history every step adds to: its size does not grow with the build file.
    pub fn settings_json(&self) -> Vec<u8> {
        canonical_json(&json!({"config": self.runtime_value(), "author": self.config.author()}))
    }

    /// Write config and manifest into `blobs`; returns the stored image.
    pub fn commit(
        &self,
        blobs: &BlobStore,
        annotations: &BTreeMap<String, String>,
    ) -> Result<StoredImage, ImageError> {
        let config_bytes = self.config_json();
        let config_digest = blobs.put(&config_bytes)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_MANIFEST.into(),
            artifact_type: None,
            config: Descriptor::new(
                MEDIA_CONFIG,
                config_digest.clone(),
                config_bytes.len() as u64,
            ),
            layers: self
                .layers
                .iter()
                .map(|l| Descriptor::new(oci_layer_type(&l.media_type), l.digest.clone(), l.size))
                .collect(),
            subject: None,
            annotations: annotations.clone(),
        };
        let manifest_bytes = to_canonical(&manifest);
        let manifest_digest = blobs.put(&manifest_bytes)?;
        Ok(StoredImage {
            manifest_digest,
            manifest_size: manifest_bytes.len() as u64,
            config_digest,
            state: self.clone(),
        })
    }
}

/// Several builds of one image, one per platform, under an OCI image index, with the
/// attestations about them.
#[derive(Debug, Clone)]
pub struct StoredIndex {
    pub digest: Digest,
    pub size: u64,
    pub images: Vec<StoredImage>,
    pub attestations: Vec<StoredAttestation>,
}

/// The media type of an in-toto statement layer.
pub const MEDIA_IN_TOTO: &str = "application/vnd.in-toto+json";
/// BuildKit's index annotations that tie an attestation manifest to its image.
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
/// The artifact type of an attestation manifest (BuildKit's, for its OCI-artifact form).
pub const ARTIFACT_ATTESTATION: &str = "application/vnd.docker.attestation.manifest.v1+json";
/// A signature manifest: its artifact type, index annotation, layer type and the layer
/// annotation that holds the signature (cosign's names).
pub const ARTIFACT_SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
pub const SIGNATURE_MANIFEST: &str = "signature";
pub const MEDIA_SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The empty config of an artifact manifest (`{}`).
pub const MEDIA_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The layer annotation naming a statement's predicate type.
pub const PREDICATE_TYPE: &str = "in-toto.io/predicate-type";

/// An attestation manifest, laid out as BuildKit lays it out: a manifest whose config says
/// `unknown/unknown` and whose layers are in-toto statements about one image. It is an OCI
/// 1.1 referrer of that image too: its `subject` is the image manifest, and its
/// `artifactType` says what it is, so it can travel beside the image (in a layout's
/// index.json, or through a registry's referrers API) as well as inside an index.
#[derive(Debug, Clone)]
pub struct StoredAttestation {
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    /// The image manifest the statements are about.
    pub subject: Digest,
    /// [`ARTIFACT_ATTESTATION`], or [`ARTIFACT_SIGNATURE`] for a signature (whose one layer
    /// is the signed payload).
    pub artifact_type: String,
    /// Each statement layer with its predicate type.
    pub statements: Vec<(LayerRef, String)>,
}

/// Write an attestation manifest about `subject` holding `statements` (predicate type, and
/// the digest and size of the statement blob, already stored), in that order.
pub fn commit_attestation(
    blobs: &BlobStore,
    subject: &StoredImage,
    statements: &[(String, Digest, u64)],
) -> Result<StoredAttestation, ImageError> {
    let mut layers = Vec::new();
    let mut descriptors = Vec::new();
    for (predicate, digest, size) in statements {
        let mut d = Descriptor::new(MEDIA_IN_TOTO, digest.clone(), *size);
        d.annotations
            .insert(PREDICATE_TYPE.into(), predicate.clone());
        descriptors.push(d);
        layers.push((
            LayerRef {
                diff_id: digest.clone(),
                digest: digest.clone(),
                size: *size,
                media_type: MEDIA_IN_TOTO.to_string(),
            },
            predicate.clone(),
        ));
    }
    let diff_ids: Vec<String> = layers.iter().map(|(l, _)| l.diff_id.to_string()).collect();
    let config = canonical_json(&json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }));
    let config_digest = blobs.put(&config)?;
    let config = Descriptor::new(MEDIA_CONFIG, config_digest, config.len() as u64);
    commit_referrer(
        blobs,
        subject,
        ARTIFACT_ATTESTATION,
        config,
        descriptors,
        layers,
    )
}

/// Write a manifest of `artifact_type` about `subject` (its `subject`), with `config` and
/// `layers` (as descriptors, and as the stored attestation lists them).
fn commit_referrer(
    blobs: &BlobStore,
    subject: &StoredImage,
    artifact_type: &str,
    config: Descriptor,
    descriptors: Vec<Descriptor>,
    statements: Vec<(LayerRef, String)>,
) -> Result<StoredAttestation, ImageError> {
    let config_digest = config.digest.clone();
    let manifest = to_canonical(&Manifest {
        schema_version: 2,
        media_type: MEDIA_MANIFEST.into(),
        config,
        layers: descriptors,
        artifact_type: Some(artifact_type.into()),
        subject: Some(Descriptor::new(
            MEDIA_MANIFEST,
            subject.manifest_digest.clone(),
            subject.manifest_size,
        )),
        annotations: BTreeMap::new(),
    });
    let manifest_digest = blobs.put(&manifest)?;
    Ok(StoredAttestation {
        manifest_digest,
        manifest_size: manifest.len() as u64,
        config_digest,
        subject: subject.manifest_digest.clone(),
        artifact_type: artifact_type.to_string(),
        statements,
    })
}

/// Write a signature manifest about `subject`: the signed `payload` as its layer, the
/// signature (base64) in the layer's annotation, an empty config.
pub fn commit_signature(
    blobs: &BlobStore,
    subject: &StoredImage,
    payload: &[u8],
    signature_b64: &str,
) -> Result<StoredAttestation, ImageError> {
    let payload_digest = blobs.put(payload)?;
    let config_digest = blobs.put(b"{}")?;
    let mut layer = Descriptor::new(
        MEDIA_SIMPLE_SIGNING,
        payload_digest.clone(),
        payload.len() as u64,
    );
    layer
        .annotations
        .insert(SIGNATURE_ANNOTATION.into(), signature_b64.to_string());
    commit_referrer(
        blobs,
        subject,
        ARTIFACT_SIGNATURE,
        Descriptor::new(MEDIA_EMPTY, config_digest, 2),
        vec![layer],
        vec![(
            LayerRef {
                diff_id: payload_digest.clone(),
                digest: payload_digest,
                size: payload.len() as u64,
                media_type: MEDIA_SIMPLE_SIGNING.to_string(),
            },
            String::new(),
        )],
    )
}

/// Whether an index entry or referrer names an attestation or signature manifest.
pub fn is_referrer_type(t: &str) -> bool {
    t == ARTIFACT_ATTESTATION || t == ARTIFACT_SIGNATURE
}

/// The index descriptor of an attestation manifest.
pub fn attestation_descriptor(a: &StoredAttestation) -> Descriptor {
    let mut d = Descriptor::new(MEDIA_MANIFEST, a.manifest_digest.clone(), a.manifest_size);
    d.platform = Some(PlatformSpec {
        os: "unknown".into(),
        architecture: "unknown".into(),
        variant: None,
    });
    d.annotations
        .insert(REFERENCE_DIGEST.into(), a.subject.to_string());
    let kind = if a.artifact_type == ARTIFACT_SIGNATURE {
        SIGNATURE_MANIFEST
    } else {
        ATTESTATION_MANIFEST
    };
    d.annotations.insert(REFERENCE_TYPE.into(), kind.into());
    d
}

/// The descriptor of an attestation manifest as a referrer of its image: what a referrers
/// index (the registry's API, or its fallback tag) and a layout's index.json list. It keeps
/// BuildKit's annotations, so a reader of either form finds it the same way.
pub fn referrer_descriptor(a: &StoredAttestation) -> Descriptor {
    let mut d = attestation_descriptor(a);
    d.platform = None;
    d.artifact_type = Some(a.artifact_type.clone());
    d
}

/// The attestation manifests an index blob lists: (manifest, the image it is about).
pub fn attestation_entries(bytes: &[u8]) -> Vec<(Digest, Digest)> {
    serde_json::from_slice::<Value>(bytes)
        .map(|v| attestation_entries_of(&v))
        .unwrap_or_default()
}

/// The attestation manifests a parsed index lists (see [`attestation_entries`]).
pub fn attestation_entries_of(v: &Value) -> Vec<(Digest, Digest)> {
    let Some(list) = v["manifests"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter(|m| {
            let kind = m["annotations"][REFERENCE_TYPE].as_str();
            kind == Some(ATTESTATION_MANIFEST) || kind == Some(SIGNATURE_MANIFEST)
        })
        .filter_map(|m| {
            Some((
                m["digest"].as_str()?.parse().ok()?,
                m["annotations"][REFERENCE_DIGEST].as_str()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Load a stored attestation manifest.
pub fn load_attestation(
    blobs: &BlobStore,
    manifest_digest: &Digest,
    subject: &Digest,
) -> Result<StoredAttestation, ImageError> {
    let what = manifest_digest.to_string();
    let bytes = blobs.get_bounded(manifest_digest, "a manifest", MAX_MANIFEST_BYTES)?;
    let m: Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(&what, format!("manifest does not parse: {}", e)))?;
    let parse = |v: &Value| -> Result<Digest, ImageError> {
        v.as_str()
            .ok_or_else(|| invalid(&what, "a descriptor without a digest"))?
            .parse()
            .map_err(|e: super::digest::BadDigest| invalid(&what, e.to_string()))
    };
    // A referrer says itself what it is about: it must be the image it is listed for.
    if let Some(own) = m["subject"]["digest"].as_str() {
        if own != subject.to_string() {
            return Err(invalid(
                &what,
                format!("an attestation listed for {} is about {}", subject, own),
            ));
        }
    }
    let config_digest = parse(&m["config"]["digest"])?;
    let mut statements = Vec::new();
    for l in m["layers"].as_array().into_iter().flatten() {
        let digest = parse(&l["digest"])?;
        statements.push((
            LayerRef {
                diff_id: digest.clone(),
                digest,
                size: l["size"].as_u64().unwrap_or(0),
                media_type: l["mediaType"].as_str().unwrap_or("").to_string(),
            },
            l["annotations"][PREDICATE_TYPE]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ));
    }
    Ok(StoredAttestation {
        manifest_digest: manifest_digest.clone(),
        manifest_size: bytes.len() as u64,
        config_digest,
        subject: subject.clone(),
        artifact_type: m["artifactType"]
            .as_str()
            .unwrap_or(ARTIFACT_ATTESTATION)
            .to_string(),
        statements,
    })
}

/// The attestations a stored index holds (those whose blobs are stored).
pub fn load_attestations(blobs: &BlobStore, index: &Digest) -> Vec<StoredAttestation> {
    let Ok(bytes) = blobs.get_bounded(index, "an index", MAX_MANIFEST_BYTES) else {
        return Vec::new();
    };
    attestation_entries(&bytes)
        .iter()
        .filter(|(m, _)| blobs.contains(m))
        .filter_map(|(m, s)| load_attestation(blobs, m, s).ok())
        .collect()
}

/// `os/arch[/variant]` of a stored image, from its config.
pub fn platform_of(image: &StoredImage) -> String {
    let c = &image.state.config;
    match c.variant() {
        Some(v) => format!("{}/{}/{}", c.os(), c.architecture(), v),
        None => format!("{}/{}", c.os(), c.architecture()),
    }
}

/// The index descriptor of a stored image: its manifest with its platform.
pub fn platform_descriptor(image: &StoredImage) -> Descriptor {
    let c = &image.state.config;
    let mut d = Descriptor::new(
        MEDIA_MANIFEST,
        image.manifest_digest.clone(),
        image.manifest_size,
    );
    d.platform = Some(PlatformSpec {
        os: c.os().to_string(),
        architecture: c.architecture().to_string(),
        variant: c.variant().clone(),
    });
    d
}

/// The index of `images` (in that order), then their `attestations`.
fn index_of(images: &[StoredImage], attestations: &[StoredAttestation]) -> Index {
    Index {
        schema_version: 2,
        media_type: MEDIA_INDEX.into(),
        manifests: images
            .iter()
            .map(platform_descriptor)
            .chain(attestations.iter().map(attestation_descriptor))
            .collect(),
        annotations: BTreeMap::new(),
    }
}

/// Store `index`, the index of `images` and `attestations`, in canonical JSON.
fn put_index(
    blobs: &BlobStore,
    index: &Index,
    images: &[StoredImage],
    attestations: &[StoredAttestation],
) -> Result<StoredIndex, ImageError> {
    let bytes = to_canonical(index);
    let digest = blobs.put(&bytes)?;
    Ok(StoredIndex {
        digest,
        size: bytes.len() as u64,
        images: images.to_vec(),
        attestations: attestations.to_vec(),
    })
}

/// Write the index of `images` (in that order) with `annotations` on it and on each
/// image's descriptor (`descriptors`, in the same order) into `blobs`.
pub fn commit_index_annotated(
    blobs: &BlobStore,
    images: &[StoredImage],
    annotations: &BTreeMap<String, String>,
    descriptors: &[BTreeMap<String, String>],
) -> Result<StoredIndex, ImageError> {
    let mut index = index_of(images, &[]);
    index.annotations = annotations.clone();
    for (d, a) in index.manifests.iter_mut().zip(descriptors) {
        d.annotations
            .extend(a.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    put_index(blobs, &index, images, &[])
}

/// Write the index of `images` (in that order), then their `attestations`, into `blobs`.
pub fn commit_index(
    blobs: &BlobStore,
    images: &[StoredImage],
    attestations: &[StoredAttestation],
) -> Result<StoredIndex, ImageError> {
    put_index(blobs, &index_of(images, attestations), images, attestations)
}

/// The image manifests an index blob lists, with their platforms (attestation manifests
/// left out); `None` when it is no index.
pub fn index_entries(bytes: &[u8]) -> Option<Vec<(Digest, String)>> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let media = v["mediaType"].as_str().unwrap_or("");
    if media != MEDIA_INDEX
        && media != "application/vnd.docker.distribution.manifest.list.v2+json"
        && !(media.is_empty() && v["manifests"].is_array())
    {
        return None;
    }
    let mut out = Vec::new();
    for m in v["manifests"].as_array()? {
        if m["annotations"][REFERENCE_TYPE].is_string() {
            continue;
        }
        let digest: Digest = m["digest"].as_str()?.parse().ok()?;
        let p = &m["platform"];
        let mut spec = format!(
            "{}/{}",
            p["os"].as_str().unwrap_or(""),
            p["architecture"].as_str().unwrap_or("")
        );
        if let Some(v) = p["variant"].as_str() {
            spec.push('/');
            spec.push_str(v);
        }
        out.push((digest, spec));
    }
    Some(out)
}

/// Everything a name's digest holds: the images (every platform of an index that the store
/// has), and the index blob itself when it is one.
pub fn load_all(
    blobs: &BlobStore,
    digest: &Digest,
) -> Result<(Vec<StoredImage>, Option<Digest>), ImageError> {
    let bytes = blobs.get_bounded(digest, "a manifest or index", MAX_MANIFEST_BYTES)?;
    match index_entries(&bytes) {
        None => Ok((vec![load(blobs, digest)?], None)),
        Some(entries) => {
            let mut images = Vec::new();
            for (d, _) in entries.iter().filter(|(d, _)| blobs.contains(d)) {
                images.push(load(blobs, d)?);
            }
            Ok((images, Some(digest.clone())))
        }
    }
}

/// Load the image at `digest`; when it is an index, the manifest for `platform`
/// (`os/arch[/variant]`; a missing variant matches any), else its first.
pub fn load_for(
    blobs: &BlobStore,
    digest: &Digest,
    platform: &str,
) -> Result<StoredImage, ImageError> {
    let bytes = blobs.get_bounded(digest, "a manifest or index", MAX_MANIFEST_BYTES)?;
    let Some(entries) = index_entries(&bytes) else {
        return load(blobs, digest);
    };
    // A pulled index keeps only the platforms asked for: choose among those the store has.
    let present: Vec<&(Digest, String)> =
        entries.iter().filter(|(d, _)| blobs.contains(d)).collect();
    let matches = |spec: &str| spec == platform || spec.starts_with(&format!("{}/", platform));
    let chosen = present
        .iter()
        .find(|(_, spec)| matches(spec))
        .or_else(|| present.first())
        .ok_or_else(|| {
            invalid(
                digest.to_string(),
                "an index none of whose manifests is stored",
            )
        })?;
    load(blobs, &chosen.0)
}

/// The OCI name of a layer media type: a Docker schema 2 base image's layers are the same
/// bytes, so an OCI manifest lists them under OCI types.
pub fn oci_layer_type(media_type: &str) -> &str {
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        }
        other => other,
    }
}

/// The largest manifest or index read: the distribution spec's limit registries enforce.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The most layers an image may have (docker's overlay2 refuses more than 125; BuildKit's
/// snapshotters, a few hundred).
pub const MAX_IMAGE_LAYERS: usize = 1000;

/// Whether an image manifest is within the bounds an image may have (its layer count, its
/// config's size), checked before any of its blobs is fetched or copied.
pub fn check_manifest_bounds(manifest: &Value) -> Result<(), String> {
    let layers = manifest["layers"].as_array().map_or(0, Vec::len);
    if layers > MAX_IMAGE_LAYERS {
        return Err(format!(
            "the image has {} layers, over the limit of {}",
            layers, MAX_IMAGE_LAYERS
        ));
    }
    let config = manifest["config"]["size"].as_u64().unwrap_or(0);
    if config > MAX_CONFIG_BYTES {
        return Err(format!(
            "the image config is {} bytes, over the limit of {} bytes",
            config, MAX_CONFIG_BYTES
        ));
    }
    Ok(())
}

/// The largest image config read. Real configs, history included, are a few KiB to a few
/// hundred; a bigger one is refused before it is read.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Parse a config blob into an image state with the given layers.
pub fn state_from_config(
    bytes: &[u8],
    layers: Vec<LayerRef>,
    what: &str,
) -> Result<ImageState, ImageError> {
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(invalid(
            what,
            format!(
                "the image config is {} bytes, over the limit of {} bytes",
                bytes.len(),
                MAX_CONFIG_BYTES
            ),
        ));
    }
    let mut v: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(what, format!("config is not valid JSON: {}", e)))?;
    // `history` is optional in the image spec: a config without it has none.
    if let Some(obj) = v.as_object_mut() {
        if obj.get("history").is_none_or(Value::is_null) {
            obj.insert("history".into(), Value::Array(Vec::new()));
        }
    }
    let mut config: ImageConfiguration = serde_json::from_value(v.clone())
        .map_err(|e| invalid(what, format!("config does not parse: {}", e)))?;
    let mut runtime = config.config().clone().unwrap_or_default();
    config.set_config(None);
    let env: Option<Vec<(String, String)>> = runtime.env().as_ref().map(|list| {
        list.iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    });
    runtime.set_env(None);
    // First occurrence wins, as a lookup of a repeated name in `Env` does.
    let mut env_index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, (k, _)) in env.iter().flatten().enumerate() {
        env_index.entry(k.clone()).or_insert(i);
    }
    // A malformed Docker field is an error naming it, never silently a default.
    let mut docker = DockerConfig::default();
    if let Some(c) = v.get("config").and_then(Value::as_object) {
        let field = |k: &str| c.get(k).filter(|x| !x.is_null()).cloned();
        let bad = |k: &str, e: serde_json::Error| invalid(what, format!("config.{}: {}", k, e));
        if let Some(x) = field("Healthcheck") {
            docker.healthcheck =
                Some(serde_json::from_value(x).map_err(|e| bad("Healthcheck", e))?);
        }
        if let Some(x) = field("OnBuild") {
            docker.onbuild = Some(serde_json::from_value(x).map_err(|e| bad("OnBuild", e))?);
        }
        if let Some(x) = field("Shell") {
            docker.shell = Some(serde_json::from_value(x).map_err(|e| bad("Shell", e))?);
        }
        if let Some(x) = field("ArgsEscaped") {
            docker.args_escaped =
                Some(serde_json::from_value(x).map_err(|e| bad("ArgsEscaped", e))?);
        }
    }
    if config.rootfs().diff_ids().len() != layers.len() {
        return Err(invalid(
            what,
            format!(
                "config lists {} diff_ids but the manifest has {} layers",
                config.rootfs().diff_ids().len(),
                layers.len()
            ),
        ));
    }
    Ok(ImageState {
        config,
        runtime,
        env,
        env_index,
        docker,
        layers,
        extra: BTreeMap::new(),
    })
}

/// The `rootfs.diff_ids` of a config document.
pub fn diff_ids_of(config: &Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Load a stored image by manifest digest (blobs verified on read).
pub fn load(blobs: &BlobStore, manifest_digest: &Digest) -> Result<StoredImage, ImageError> {
    let what = manifest_digest.to_string();
    let mbytes = blobs.get_bounded(manifest_digest, "a manifest", MAX_MANIFEST_BYTES)?;
    let manifest: ImageManifest = serde_json::from_slice(&mbytes)
        .map_err(|e| invalid(&what, format!("manifest does not parse: {}", e)))?;
    let config_digest: Digest = manifest
        .config()
        .digest()
        .to_string()
        .parse()
        .map_err(|e: super::digest::BadDigest| invalid(&what, e.to_string()))?;
    let cbytes = blobs.get_bounded(&config_digest, "an image config", MAX_CONFIG_BYTES)?;
    if manifest.layers().len() > MAX_IMAGE_LAYERS {
        return Err(invalid(
            &what,
            format!(
                "the image has {} layers, over the limit of {}",
                manifest.layers().len(),
                MAX_IMAGE_LAYERS
            ),
        ));
    }
    let cv: Value = serde_json::from_slice(&cbytes).map_err(|e| invalid(&what, e.to_string()))?;
    let diff_ids = diff_ids_of(&cv);
    let mut layers = Vec::new();
    for (i, l) in manifest.layers().iter().enumerate() {
        let digest: Digest = l
            .digest()
            .to_string()
            .parse()
            .map_err(|e: super::digest::BadDigest| invalid(&what, e.to_string()))?;
        let diff_id: Digest = diff_ids
            .get(i)
            .ok_or_else(|| invalid(&what, "fewer diff_ids than layers"))?
            .parse()
            .map_err(|e: super::digest::BadDigest| invalid(&what, e.to_string()))?;
        layers.push(LayerRef {
            digest,
            diff_id,
            size: l.size(),
            media_type: l.media_type().to_string(),
        });
    }
    let state = state_from_config(&cbytes, layers, &what)?;
    Ok(StoredImage {
        manifest_digest: manifest_digest.clone(),
        manifest_size: mbytes.len() as u64,
        config_digest,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn canonical_sorts_keys() {
        let v = json!({"b": 1, "a": {"d": [1, {"z": 0, "y": 1}], "c": 2}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":2,"d":[1,{"y":1,"z":0}]},"b":1}"#
        );
    }

    #[test]
    fn config_round_trips_with_docker_extras() {
        let mut s = ImageState::scratch("linux", "amd64", None);
        s.set_env("PATH", "/bin");
        s.set_env("PATH", "/usr/bin");
        s.docker.shell = Some(vec!["/bin/bash".into(), "-c".into()]);
        s.push_history("1970-01-01T00:00:00Z", "ENV PATH=/usr/bin", None);
        let back = state_from_config(&s.config_json(), Vec::new(), "test").unwrap();
        assert_eq!(
            back.env(),
            vec![("PATH".to_string(), "/usr/bin".to_string())]
        );
        assert_eq!(
            back.docker.shell,
            Some(vec!["/bin/bash".to_string(), "-c".to_string()])
        );
        assert_eq!(back.config_json(), s.config_json());
    }
}
