//! Caches shared between machines (`--cache-to`, `--cache-from`). A cache is an OCI artifact:
//! an image manifest whose config (media type [`CACHE_CONFIG`]) lists records, each a step's
//! cache key with the image config and layers after that step, and whose layers are those
//! layers' blobs. It lives in a registry (`type=registry,ref=REF`) or an OCI layout directory
//! (`type=local,dest=DIR` / `src=DIR`). Importing reads only the record list. A hit's layers
//! are copied from a directory; a registry's stay there until something reads their bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::StepRecord;
use super::{CacheIndex, CacheKey};
use crate::attest::sbom;
use crate::oci::blobs::{write_atomic, BlobStore};
use crate::oci::digest::Digest;
use crate::oci::image::{
    canonical_json, state_from_config, ImageState, LayerRef, MEDIA_INDEX, MEDIA_MANIFEST,
};
use crate::registry::client::Client;
use crate::registry::pull::{descriptor, fetch_blob, get_manifest, Descriptor};
use crate::registry::{push, Reference, RegistryError};
use crate::store::{Bucket, Store};

pub const CACHE_CONFIG: &str = "application/vnd.builder.cache.config.v1+json";
pub const CACHE_ARTIFACT: &str = "application/vnd.builder.cache.v1";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where a cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Registry(Reference),
    Dir(PathBuf),
    /// `--cache-to type=inline`: in the built image's own config (read back with
    /// `--cache-from type=registry,ref=IMAGE`).
    Inline,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{}", r),
            Location::Dir(d) => write!(f, "{}", d.display()),
            Location::Inline => write!(f, "the image (inline)"),
        }
    }
}

/// Which steps an exported cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The steps of the stage that became the image.
    Min,
    /// Every step of every stage the build ran.
    Max,
}

fn fields(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut kv = BTreeMap::new();
    for f in s.split(',') {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| format!("{:?}: expected key=value fields", s))?;
        kv.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(kv)
}

fn location(kv: &BTreeMap<String, String>, dir_key: &str, s: &str) -> Result<Location, String> {
    match kv.get("type").map(String::as_str) {
        Some("registry") => {
            let r = kv
                .get("ref")
                .ok_or_else(|| format!("{:?}: type=registry needs ref=REF", s))?;
            Ok(Location::Registry(
                Reference::parse(r)
                    .map_err(|e| e.to_string())?
                    .with_default_tag(),
            ))
        }
        Some("local") => kv
            .get(dir_key)
            .map(|d| Location::Dir(PathBuf::from(d)))
            .ok_or_else(|| format!("{:?}: type=local needs {}=DIR", s, dir_key)),
        Some("inline") if dir_key == "dest" => Ok(Location::Inline),
        Some("inline") => Err(format!(
            "{:?}: an inline cache is read from its image: --cache-from type=registry,ref=IMAGE",
            s
        )),
        Some(t) => Err(format!(
            "{:?}: unknown cache type {:?} (registry, local or inline)",
            s, t
        )),
        None => Err(format!(
            "{:?}: type= is required (registry, local or inline)",
            s
        )),
    }
}

/// Parse a `--cache-from` value.
pub fn parse_import(s: &str) -> Result<Location, String> {
    location(&fields(s)?, "src", s)
}

/// What `--cache-to` exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    pub mode: Mode,
    /// The contents of the build's `RUN --mount=type=cache` mounts too (`cache-mounts=`;
    /// on by default with `mode=max`).
    pub cache_mounts: bool,
    /// At most this many bytes of each mount, the newest files first (`cache-mounts-max=`).
    pub cache_mounts_max: u64,
}

/// Parse a `--cache-to` value.
pub fn parse_export(s: &str) -> Result<(Location, ExportOptions), String> {
    let kv = fields(s)?;
    let mode = match kv.get("mode").map(String::as_str) {
        None | Some("min") => Mode::Min,
        Some("max") => Mode::Max,
        Some(m) => return Err(format!("{:?}: mode is min or max, not {:?}", s, m)),
    };
    let cache_mounts = match kv.get("cache-mounts").map(String::as_str) {
        None => mode == Mode::Max,
        Some("true") => true,
        Some("false") => false,
        Some(v) => {
            return Err(format!(
                "{:?}: cache-mounts is true or false, not {:?}",
                s, v
            ))
        }
    };
    let cache_mounts_max = match kv.get("cache-mounts-max") {
        None => super::mounts::DEFAULT_MAX_BYTES,
        Some(v) => super::gc::parse_size(v).ok_or_else(|| {
            format!(
                "{:?}: cache-mounts-max is a size (e.g. 512MB), not {:?}",
                s, v
            )
        })?,
    };
    let location = location(&kv, "dest", s)?;
    Ok((
        location,
        ExportOptions {
            mode,
            cache_mounts: cache_mounts
                && !matches!(kv.get("type").map(String::as_str), Some("inline")),
            cache_mounts_max,
        },
    ))
}

/// One step's result in an imported cache.
struct Record {
    config: Vec<u8>,
    layers: Vec<LayerRef>,
}

/// An imported cache: its records, and where to fetch their layers.
pub struct RemoteCache {
    location: Location,
    /// Where the store remembers layers left at the registry.
    origins: crate::registry::origins::OriginDirs,
    records: HashMap<String, Record>,
    /// Cache mounts' contents, by the mount's key (its directory's name).
    mounts: HashMap<String, Vec<LayerRef>>,
}

fn bad(what: &str, msg: impl std::fmt::Display) -> RegistryError {
    RegistryError::Protocol(format!("cache {}: {}", what, msg))
}

/// Keep the SBOM scans a cache carries (by diff_id) where this store's SBOMs read them, so a
/// build that hits the cache writes its SBOM without fetching the layers. Only scans of
/// layers the records hold are taken; a scan already here, or one of another scanner
/// version, is left alone.
fn import_scans(doc: &Value, records: &HashMap<String, Record>, dir: &Path) {
    let Some(scans) = doc["scans"].as_object() else {
        return;
    };
    let held: BTreeSet<&Digest> = records
        .values()
        .flat_map(|r| r.layers.iter().map(|l| &l.diff_id))
        .collect();
    for (hex, scan) in scans {
        let Ok(diff_id) = format!("sha256:{}", hex).parse::<Digest>() else {
            continue;
        };
        if !held.contains(&diff_id) || sbom::scan_path(dir, &diff_id).is_file() {
            continue;
        }
        if let Ok(scan) = serde_json::from_value::<sbom::LayerScan>(scan.clone()) {
            if scan.is_current() {
                sbom::store_scan(dir, &diff_id, &scan);
            }
        }
    }
}

/// The SBOM scans of `layers` this store has (scanning a layer whose bytes are here), by
/// diff_id; a layer still at its registry is not fetched for it.
fn export_scans(layers: &[LayerRef], store: &Store) -> serde_json::Map<String, Value> {
    let dir = store.dir(Bucket::Sbom);
    let mut out = serde_json::Map::new();
    for l in layers {
        if out.contains_key(l.diff_id.hex()) {
            continue;
        }
        let scan = if store.blobs.contains(&l.digest) {
            sbom::scan_cached(&store.blobs, l, &dir).ok()
        } else {
            sbom::cached_scan(&dir, &l.diff_id)
        };
        if let Some(v) = scan.and_then(|s| serde_json::to_value(s).ok()) {
            out.insert(l.diff_id.hex().to_string(), v);
        }
    }
    out
}

/// A JSON list of layers (none when it is missing); `None` when one is malformed.
fn layer_list(v: &Value) -> Option<Vec<LayerRef>> {
    match v.as_array() {
        Some(a) => a.iter().map(LayerRef::from_json).collect(),
        None => Some(Vec::new()),
    }
}

/// The cache mounts a cache's document lists: each mount's key and layers.
fn read_mounts(v: &Value, what: &str) -> Result<HashMap<String, Vec<LayerRef>>, RegistryError> {
    let mut out = HashMap::new();
    for (key, layers) in v["mounts"].as_object().cloned().unwrap_or_default() {
        let layers = layer_list(&layers)
            .ok_or_else(|| bad(what, format!("cache mount {} has a malformed layer", key)))?;
        out.insert(key, layers);
    }
    Ok(out)
}

/// A cache artifact's document: its records (their SBOM scans kept in `store`) and mounts.
type Document = (HashMap<String, Record>, HashMap<String, Vec<LayerRef>>);

fn read_document(doc: &[u8], what: &str, store: &Store) -> Result<Document, RegistryError> {
    let v: Value = serde_json::from_slice(doc).map_err(|e| bad(what, e))?;
    let records = read_records(&v, what)?;
    import_scans(&v, &records, &store.dir(Bucket::Sbom));
    Ok((records, read_mounts(&v, what)?))
}

fn read_records(v: &Value, what: &str) -> Result<HashMap<String, Record>, RegistryError> {
    let mut out = HashMap::new();
    for r in v["records"].as_array().cloned().unwrap_or_default() {
        let key = r["key"].as_str().unwrap_or("").to_string();
        let config = r["config"].as_str().unwrap_or("").as_bytes().to_vec();
        let layers = layer_list(&r["layers"])
            .ok_or_else(|| bad(what, format!("record {} has a malformed layer", key)))?;
        out.insert(key, Record { config, layers });
    }
    Ok(out)
}

impl RemoteCache {
    /// Read the record list of the cache at `location`. `None` when no cache is there yet
    /// (the first build of a pipeline).
    pub fn load(
        location: &Location,
        client: Arc<Client>,
        store: &Store,
    ) -> Result<Option<RemoteCache>, RegistryError> {
        let (records, mounts) = match location {
            Location::Registry(r) => {
                let what = r.familiar();
                let ep = client.endpoint(&r.registry)?;
                let m = match get_manifest(&client, &ep, &r.repository, &r.manifest_ref(), &what) {
                    Ok(m) => m,
                    Err(RegistryError::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let manifest: Value =
                    serde_json::from_slice(&m.bytes).map_err(|e| bad(&what, e))?;
                if crate::registry::pull::is_index(manifest["mediaType"].as_str().unwrap_or(""))
                    || manifest["config"]["mediaType"].as_str() != Some(CACHE_CONFIG)
                {
                    // An image (or an index of them) with its cache inline.
                    let records = inline_from_registry(&client, &ep, r, &manifest, store)?;
                    if records.is_empty() {
                        return Err(bad(
                            &what,
                            format!(
                                "{} is neither a builder cache nor an image built with --cache-to type=inline",
                                what
                            ),
                        ));
                    }
                    (records, HashMap::new())
                } else {
                    let config = descriptor(&manifest["config"], &what)?;
                    fetch_blob(&client, &ep, &store.blobs, &r.repository, &config)?;
                    let doc = store.blobs.get(&config.digest)?;
                    read_document(&doc, &what, store)?
                }
            }
            Location::Inline => {
                return Err(bad(
                    "inline",
                    "an inline cache is read from its image: --cache-from type=registry,ref=IMAGE",
                ))
            }
            Location::Dir(dir) => {
                let what = dir.display().to_string();
                let index = match fs::read(dir.join("index.json")) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(bad(&what, e)),
                };
                let index: Value = serde_json::from_slice(&index).map_err(|e| bad(&what, e))?;
                let Some(m) = index["manifests"]
                    .as_array()
                    .and_then(|a| a.first())
                    .cloned()
                else {
                    return Ok(None);
                };
                let md = descriptor(&m, &what)?;
                let manifest: Value = serde_json::from_slice(&read_verified(dir, &md.digest)?)
                    .map_err(|e| bad(&what, e))?;
                let config = descriptor(&manifest["config"], &what)?;
                let doc = read_verified(dir, &config.digest)?;
                read_document(&doc, &what, store)?
            }
        };
        Ok(Some(RemoteCache {
            location: location.clone(),
            origins: store.origins(),
            records,
            mounts,
        }))
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Where it was imported from.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Fill the empty cache mount `dir` whose key is `key` from this cache, if it holds
    /// that mount; returns the bytes it brought. Layers at a registry are downloaded now.
    pub fn restore_mount(
        &self,
        key: &str,
        dir: &Path,
        blobs: &BlobStore,
    ) -> Result<Option<u64>, String> {
        let Some(layers) = self.mounts.get(key) else {
            return Ok(None);
        };
        for l in layers.iter().filter(|l| !blobs.contains(&l.digest)) {
            let d = Descriptor::new(l.media_type.clone(), l.digest.clone(), l.size);
            match &self.location {
                Location::Registry(r) => self.origins.remember_lazy(&d, &r.registry, &r.repository),
                Location::Dir(src) => {
                    let bytes = read_verified(src, &d.digest).map_err(|e| e.to_string())?;
                    blobs.put(&bytes).map_err(|e| e.to_string())?;
                }
                Location::Inline => return Ok(None),
            }
        }
        super::mounts::restore(layers, dir, blobs)?;
        Ok(Some(layers.iter().map(|l| l.size).sum()))
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The state after the step `key`, with its layers available to `blobs` (copied from a
    /// directory; from a registry, fetched when first read); `None` when the cache lacks the
    /// key or a layer cannot be had (the step then simply runs).
    pub fn materialize(&self, key: &CacheKey, blobs: &BlobStore) -> Option<ImageState> {
        let record = self.records.get(key.0.hex())?;
        for l in &record.layers {
            if blobs.contains(&l.digest) {
                continue;
            }
            let d = Descriptor::new(l.media_type.clone(), l.digest.clone(), l.size);
            match &self.location {
                // Left at the registry: fetched if a later step or an output reads it, and
                // mounted by a push to the same registry.
                Location::Registry(r) => {
                    self.origins.remember_lazy(&d, &r.registry, &r.repository);
                }
                Location::Dir(dir) => {
                    let bytes = read_verified(dir, &d.digest).ok()?;
                    blobs.put(&bytes).ok()?;
                }
                Location::Inline => return None,
            }
        }
        blobs.put(&record.config).ok()?;
        state_from_config(&record.config, record.layers.clone(), "imported cache").ok()
    }
}

/// A blob of an OCI layout directory, checked against its digest.
fn read_verified(dir: &Path, d: &Digest) -> Result<Vec<u8>, RegistryError> {
    let p = dir.join("blobs/sha256").join(d.hex());
    let bytes = fs::read(&p).map_err(|e| bad(&p.display().to_string(), e))?;
    let got = Digest::of(&bytes);
    if &got != d {
        return Err(RegistryError::DigestMismatch {
            what: p.display().to_string(),
            expected: d.to_string(),
            got: got.to_string(),
        });
    }
    Ok(bytes)
}

/// Write the cache of a finished build to `location`; returns how many steps it holds.
pub fn export(
    location: &Location,
    options: ExportOptions,
    steps: &[StepRecord],
    target_stage: usize,
    cache_mounts: &[(String, PathBuf)],
    store: &Store,
    client: &Client,
) -> Result<usize, RegistryError> {
    let mode = options.mode;
    let index = CacheIndex::new(&store.dir(Bucket::Steps), &store.blobs);
    let mut seen = BTreeSet::new();
    let mut records = Vec::new();
    let mut layers: Vec<LayerRef> = Vec::new();
    let mut layer_seen = BTreeSet::new();
    for s in steps {
        if mode == Mode::Min && s.stage != target_stage {
            continue;
        }
        if !seen.insert(s.key.0.clone()) {
            continue;
        }
        let Some((config, entry_layers)) = index.entry(&s.key) else {
            continue;
        };
        let config_bytes = store.blobs.get(&config)?;
        let config_text = String::from_utf8(config_bytes)
            .map_err(|_| bad("export", format!("config {} is not UTF-8", config)))?;
        let layer_values: Vec<Value> = entry_layers.iter().map(LayerRef::to_json).collect();
        for l in &entry_layers {
            if layer_seen.insert(l.digest.clone()) {
                layers.push(l.clone());
            }
        }
        records.push(json!({"key": s.key.0.hex(), "config": config_text, "layers": layer_values}));
    }
    let count = records.len();
    if *location == Location::Inline {
        // Already in the image's config (see `inline_records`).
        return Ok(count);
    }
    // Sorted, so the same cache content always makes the same artifact.
    records.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    layers.sort_by_key(|l| l.digest.to_string());
    // The layers' SBOM scans travel with them: an importing build that hits needs no bytes.
    let scans = export_scans(&layers, store);
    // Cache mounts travel as layers of their own, listed by the mount's key.
    let mut mounts = serde_json::Map::new();
    if options.cache_mounts {
        for (key, dir) in cache_mounts {
            let packed = super::mounts::pack(dir, options.cache_mounts_max, &store.blobs)
                .map_err(|e| bad("cache mount", e))?;
            for l in &packed {
                if layer_seen.insert(l.digest.clone()) {
                    layers.push(l.clone());
                }
            }
            mounts.insert(
                key.clone(),
                json!(packed.iter().map(LayerRef::to_json).collect::<Vec<_>>()),
            );
        }
        layers.sort_by_key(|l| l.digest.to_string());
    }
    let doc = canonical_json(&json!({"records": records, "scans": scans, "mounts": mounts}));
    let config_digest = store.blobs.put(&doc)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": CACHE_ARTIFACT,
        "config": {"mediaType": CACHE_CONFIG, "digest": config_digest.to_string(), "size": doc.len()},
        "layers": layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size})).collect::<Vec<_>>(),
    });
    let manifest_bytes = canonical_json(&manifest);
    let manifest_digest = store.blobs.put(&manifest_bytes)?;
    match location {
        Location::Registry(r) => {
            push::push(client, &store.local(), &manifest_digest, r)?;
        }
        Location::Dir(dir) => {
            let io = |p: &Path, e: std::io::Error| bad(&p.display().to_string(), e);
            let bdir = dir.join("blobs/sha256");
            fs::create_dir_all(&bdir).map_err(|e| io(&bdir, e))?;
            let mut digests: Vec<&Digest> = layers.iter().map(|l| &l.digest).collect();
            digests.push(&config_digest);
            digests.push(&manifest_digest);
            for d in digests {
                crate::export::place_blob(&store.blobs, dir, d)
                    .map_err(|e| bad(&dir.display().to_string(), e))?;
            }
            let layout = dir.join("oci-layout");
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| io(&layout, e))?;
            // index.json last: a reader sees the old cache or the new one, never half of one.
            let index_doc = json!({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "artifactType": CACHE_ARTIFACT,
                "digest": manifest_digest.to_string(),
                "size": manifest_bytes.len(),
                "annotations": {REF_NAME: "cache"},
            }]});
            let p = dir.join("index.json");
            write_atomic(&p, &canonical_json(&index_doc)).map_err(|e| io(&p, e))?;
        }
        Location::Inline => {}
    }
    Ok(count)
}

/// The inline cache of an image whose layers are `image_layers`: the records of `steps`
/// (those of `target_stage` alone, as BuildKit's inline cache is `mode=min`), each the
/// step's key, its config, and how many of the image's layers it had, with the layers'
/// SBOM scans. A step whose layers are not the image's first ones (`--force-compression`
/// rewrote them) is left out.
pub fn inline_records(
    steps: &[StepRecord],
    target_stage: usize,
    image_layers: &[LayerRef],
    store: &Store,
) -> Result<Value, RegistryError> {
    let index = CacheIndex::new(&store.dir(Bucket::Steps), &store.blobs);
    let mut records = BTreeMap::new();
    for s in steps.iter().filter(|s| s.stage == target_stage) {
        let Some((config, layers)) = index.entry(&s.key) else {
            continue;
        };
        if image_layers.get(..layers.len()) != Some(&layers[..]) {
            continue;
        }
        let config_bytes = store.blobs.get(&config)?;
        let config_text = String::from_utf8(config_bytes)
            .map_err(|_| bad("export", format!("config {} is not UTF-8", config)))?;
        records.insert(
            s.key.0.hex().to_string(),
            json!({"key": s.key.0.hex(), "config": config_text, "layers": layers.len()}),
        );
    }
    // The layers' SBOM scans travel too: an importing build that hits needs no bytes.
    let scans = export_scans(image_layers, store);
    Ok(json!({"records": records.into_values().collect::<Vec<_>>(), "scans": scans}))
}

/// The inline records of the image `manifest` at `r`, or of every image an index lists.
fn inline_from_registry(
    client: &Client,
    ep: &crate::registry::client::Endpoint,
    r: &Reference,
    manifest: &Value,
    store: &Store,
) -> Result<HashMap<String, Record>, RegistryError> {
    let what = r.familiar();
    let mut images = Vec::new();
    if crate::registry::pull::is_index(manifest["mediaType"].as_str().unwrap_or("")) {
        for m in manifest["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let d = descriptor(&m, &what)?;
            // Attestation manifests carry no cache.
            if m["annotations"]["vnd.docker.reference.type"].is_string() {
                continue;
            }
            let child = get_manifest(client, ep, &r.repository, &d.digest.to_string(), &what)?;
            images.push(serde_json::from_slice::<Value>(&child.bytes).map_err(|e| bad(&what, e))?);
        }
    } else {
        images.push(manifest.clone());
    }
    let mut out = HashMap::new();
    for image in images {
        let config = descriptor(&image["config"], &what)?;
        fetch_blob(client, ep, &store.blobs, &r.repository, &config)?;
        let config_bytes = store.blobs.get(&config.digest)?;
        let config_value: Value =
            serde_json::from_slice(&config_bytes).map_err(|e| bad(&what, e))?;
        let diff_ids = crate::oci::image::diff_ids_of(&config_value);
        let mut layers = Vec::new();
        for (l, diff_id) in image["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .zip(&diff_ids)
        {
            let d = descriptor(l, &what)?;
            layers.push(LayerRef {
                digest: d.digest,
                diff_id: diff_id
                    .parse()
                    .map_err(|_| bad(&what, "a malformed diff_id"))?,
                size: d.size,
                media_type: d.media_type,
            });
        }
        let inline = &config_value[crate::oci::image::INLINE_CACHE_FIELD];
        let records = read_inline_records(inline, &layers, &what)?;
        import_scans(inline, &records, &store.dir(Bucket::Sbom));
        out.extend(records);
    }
    Ok(out)
}

/// The records of an image's inline cache (`inline`, its config's field), with their
/// layers the image's first ones.
fn read_inline_records(
    inline: &Value,
    image_layers: &[LayerRef],
    what: &str,
) -> Result<HashMap<String, Record>, RegistryError> {
    let mut out = HashMap::new();
    let records = inline["records"].as_array().cloned().unwrap_or_default();
    for r in records {
        let key = r["key"].as_str().unwrap_or("").to_string();
        let n = r["layers"].as_u64().unwrap_or(u64::MAX) as usize;
        let layers = image_layers
            .get(..n)
            .ok_or_else(|| {
                bad(
                    what,
                    format!("record {} names more layers than the image has", key),
                )
            })?
            .to_vec();
        let config = r["config"].as_str().unwrap_or("").as_bytes().to_vec();
        out.insert(key, Record { config, layers });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cache_options() {
        assert_eq!(
            parse_import("type=local,src=/tmp/c").unwrap(),
            Location::Dir("/tmp/c".into())
        );
        let (l, m) = parse_export("type=registry,ref=127.0.0.1:5000/cache,mode=max").unwrap();
        assert_eq!(m.mode, Mode::Max);
        assert!(m.cache_mounts, "mode=max takes the cache mounts");
        match l {
            Location::Registry(r) => assert_eq!(r.to_string(), "127.0.0.1:5000/cache:latest"),
            other => panic!("{:?}", other),
        }
        let min = parse_export("type=local,dest=d").unwrap().1;
        assert_eq!((min.mode, min.cache_mounts), (Mode::Min, false));
        let opted = parse_export("type=local,dest=d,cache-mounts=true,cache-mounts-max=10MB")
            .unwrap()
            .1;
        assert!(opted.cache_mounts && opted.cache_mounts_max < 11_000_000);
        assert!(parse_export("type=local,dest=d,cache-mounts=maybe").is_err());
        assert_eq!(parse_export("type=inline").unwrap().0, Location::Inline);
        assert!(parse_import("type=inline").is_err());
        assert!(parse_export("type=local,dest=d,mode=all").is_err());
        assert!(parse_import("type=registry").is_err());
        assert!(parse_import("type=s3,bucket=x").is_err());
        assert!(parse_import("registry").is_err());
    }
}
