//! Space management: `builder cache du` and `builder cache prune`. Pruning takes the store's
//! lease exclusively (every build holds it shared for its whole run), so it never removes
//! what a running build is writing, and it never removes a blob or snapshot that a tagged
//! image or a kept cache entry needs. It walks every bucket of the store's layout, and says
//! for each what becomes of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use fs2::FileExt;

use super::CacheIndex;
use crate::oci::digest::Digest;
use crate::oci::image;
use crate::store::{Bucket, Store, StoreError, StoreFile};
use crate::worker::snapshots::chain_ids;

/// Held by builds (shared) and by prune (exclusive).
pub struct Lease {
    _file: fs::File,
}

fn lease_file(store: &Store) -> Result<fs::File, StoreError> {
    let p = store.file(StoreFile::GcLock);
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|source| StoreError::Io { path: p, source })
}

/// Taken by every build for its whole run.
pub fn build_lease(store: &Store) -> Result<Lease, StoreError> {
    let f = lease_file(store)?;
    f.lock_shared().map_err(|source| StoreError::Io {
        path: store.file(StoreFile::GcLock),
        source,
    })?;
    Ok(Lease { _file: f })
}

/// Parse `10GB`, `512MB`, `1.5g`, `100k`, `4096` (decimal units, as docker takes them).
pub fn parse_size(s: &str) -> Option<u64> {
    parse_size_in(s, 1000).ok()
}

/// A number with an optional unit, `k`, `m`, `g` or `t` (`b`, `ib` or `i` may follow), each
/// `base` times the one before: 1000 as docker's sizes, 1024 as its memory sizes.
pub fn parse_size_in(s: &str, base: u64) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let n: f64 = t[..split]
        .parse()
        .map_err(|_| "want a number with an optional unit (b, k, m, g)".to_string())?;
    let power = match t[split..]
        .trim()
        .trim_end_matches('b')
        .trim_end_matches('i')
    {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        other => return Err(format!("unknown unit {:?}: b, k, m, g or t", other)),
    };
    Ok((n * (base as f64).powi(power)) as u64)
}

/// What the store holds, for `du`.
pub struct Usage {
    pub entries: usize,
    pub cache_only_bytes: u64,
    pub image_bytes: u64,
    pub snapshot_bytes: u64,
    /// Tar segments kept for rewriting COPY layers (`cache/segments/`).
    pub segment_bytes: u64,
    /// Scratch under `tmp/`: running builds' and dead ones' leftovers.
    pub scratch_bytes: u64,
}

/// The images names point at (every stored platform of an index), loaded once, and the
/// other blobs they keep: index blobs, and their attestation manifests with what those hold.
fn tagged_images(store: &Store) -> Result<(Vec<image::StoredImage>, Vec<Digest>), StoreError> {
    let mut images = Vec::new();
    let mut indexes = Vec::new();
    for named in store.refs()?.values() {
        // A name also keeps the index that carries its image with the build's attestations.
        let attested = store.attested(named);
        for d in std::iter::once(named).chain(attested.as_ref()) {
            keep_image(store, d, &mut images, &mut indexes);
        }
        // And those kept beside each of its images (a pull's referrers, a layout's).
        let each: Vec<Digest> = image::load_all(&store.blobs, named)
            .map(|(found, _)| found.into_iter().map(|i| i.manifest_digest).collect())
            .unwrap_or_default();
        for d in each.iter().filter_map(|i| store.attested(i)) {
            keep_image(store, &d, &mut images, &mut indexes);
        }
    }
    Ok((images, indexes))
}

/// Add what `d` (an image or an index) holds to the images and the other blobs kept.
fn keep_image(
    store: &Store,
    d: &Digest,
    images: &mut Vec<image::StoredImage>,
    indexes: &mut Vec<Digest>,
) {
    let Ok((found, index)) = image::load_all(&store.blobs, d) else {
        return;
    };
    images.extend(found);
    if let Some(index) = index {
        for a in image::load_attestations(&store.blobs, &index) {
            indexes.push(a.manifest_digest);
            indexes.push(a.config_digest);
            indexes.extend(a.statements.into_iter().map(|(l, _)| l.digest));
        }
        indexes.push(index);
    }
}

/// Every blob a tagged image needs.
fn blobs_of((images, indexes): &(Vec<image::StoredImage>, Vec<Digest>)) -> BTreeSet<Digest> {
    let mut live: BTreeSet<Digest> = indexes.iter().cloned().collect();
    for img in images {
        live.insert(img.manifest_digest.clone());
        live.insert(img.config_digest.clone());
        live.extend(img.state.layers.iter().map(|l| l.digest.clone()));
    }
    live
}

fn size_of(store: &Store, d: &Digest) -> u64 {
    fs::metadata(store.blobs.path(d))
        .map(|m| m.len())
        .unwrap_or(0)
}

pub fn usage(store: &Store) -> Result<Usage, StoreError> {
    let index = CacheIndex::new(&store.dir(Bucket::Steps), &store.blobs);
    let tagged = blobs_of(&tagged_images(store)?);
    let entries = index.entries();
    let mut cache_blobs = BTreeSet::new();
    for (_, _, config, layers) in &entries {
        cache_blobs.extend(config.iter().cloned());
        cache_blobs.extend(layers.iter().cloned());
    }
    Ok(Usage {
        entries: entries.len(),
        cache_only_bytes: cache_blobs
            .difference(&tagged)
            .map(|d| size_of(store, d))
            .sum(),
        image_bytes: tagged.iter().map(|d| size_of(store, d)).sum(),
        snapshot_bytes: crate::store::tree_size(&store.dir(Bucket::Snapshots)),
        segment_bytes: crate::store::tree_size(&store.dir(Bucket::Segments)),
        scratch_bytes: crate::store::tree_size(&store.dir(Bucket::Tmp)),
    })
}

/// Which cache entries a prune removes.
pub struct PruneOptions {
    pub all: bool,
    pub keep_storage: Option<u64>,
    pub older_than_secs: Option<u64>,
}

/// What a prune removed.
pub struct Pruned {
    pub entries: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub snapshots: usize,
    /// Bytes of scratch removed (leftovers of killed builds).
    pub scratch_bytes: u64,
}

pub fn prune(store: &Store, opts: &PruneOptions) -> Result<Pruned, StoreError> {
    let f = lease_file(store)?;
    f.lock_exclusive().map_err(|source| StoreError::Io {
        path: store.file(StoreFile::GcLock),
        source,
    })?;
    let index = CacheIndex::new(&store.dir(Bucket::Steps), &store.blobs);
    let images = tagged_images(store)?;
    let tagged = blobs_of(&images);
    let images = images.0;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut entries = index.entries();
    entries.sort_by_key(|e| e.1);
    let mut remove: BTreeSet<usize> = BTreeSet::new();
    for (i, (_, created, _, layers)) in entries.iter().enumerate() {
        let old = opts
            .older_than_secs
            .is_some_and(|age| now.saturating_sub(*created) > age);
        let dangling = !layers.iter().all(|l| tagged.contains(l));
        let selected = if opts.all {
            true
        } else if opts.older_than_secs.is_some() {
            old
        } else {
            opts.keep_storage.is_none() && dangling
        };
        if selected {
            remove.insert(i);
        }
    }
    if let Some(limit) = opts.keep_storage {
        // Oldest first, until what the remaining entries hold fits. Each blob is sized once.
        let mut sizes: BTreeMap<Digest, u64> = BTreeMap::new();
        let mut kept: Vec<usize> = (0..entries.len()).filter(|i| !remove.contains(i)).collect();
        loop {
            let mut blobs = BTreeSet::new();
            for &i in &kept {
                blobs.extend(entries[i].2.iter().cloned());
                blobs.extend(entries[i].3.iter().cloned());
            }
            let total: u64 = blobs
                .difference(&tagged)
                .map(|d| *sizes.entry(d.clone()).or_insert_with(|| size_of(store, d)))
                .sum();
            if total <= limit || kept.is_empty() {
                break;
            }
            remove.insert(kept.remove(0));
        }
    }
    let mut pruned = Pruned {
        entries: 0,
        blobs: 0,
        bytes: 0,
        snapshots: 0,
        scratch_bytes: 0,
    };
    for &i in &remove {
        if fs::remove_file(&entries[i].0).is_ok() {
            pruned.entries += 1;
        }
    }
    // Everything still needed.
    let mut live = tagged.clone();
    for (_, _, config, layers) in index.entries() {
        live.extend(config.iter().cloned());
        live.extend(layers.iter().cloned());
    }
    // Snapshots of chains no tagged image uses any more; cache hits rebuild theirs on demand.
    let mut live_chains = BTreeSet::new();
    for img in &images {
        live_chains.extend(
            chain_ids(&img.state.layers)
                .into_iter()
                .map(|c| c.hex().to_string()),
        );
    }
    // Every bucket, blobs first: what the others remember is checked against the blobs kept.
    for bucket in Bucket::ALL {
        match bucket {
            Bucket::Blobs => {
                for d in store.blobs.list()? {
                    if !live.contains(&d) {
                        pruned.bytes += size_of(store, &d);
                        if fs::remove_file(store.blobs.path(&d)).is_ok() {
                            pruned.blobs += 1;
                        }
                    }
                }
            }
            // Entries were removed above, by age, size or danglingness.
            Bucket::Steps => {}
            // The chunk tables of removed layers go with them.
            Bucket::Chunks => super::chunks::forget_missing(&store.dir(bucket), &store.blobs),
            // And the tar segments no stored layer was written with (all of them with --all).
            Bucket::Segments => {
                pruned.bytes +=
                    super::segments::forget_missing(&store.dir(bucket), &store.blobs, opts.all)
            }
            // Records of layers left at registries that nothing needs any more.
            Bucket::Lazy => {
                store.origins().forget_lazy_except(&live);
            }
            // Which repositories hold a blob stays true while the registry keeps it.
            Bucket::Origins => {}
            // Memos whose result is gone, or that do not parse.
            Bucket::Converted => {
                store.memo(bucket).retain(|b| {
                    serde_json::from_slice::<serde_json::Value>(b)
                        .ok()
                        .and_then(|v| crate::oci::image::LayerRef::from_json(&v))
                        .is_some_and(|c| store.blobs.available(&c.digest))
                });
            }
            Bucket::Statements => {
                store.memo(bucket).retain(|b| {
                    std::str::from_utf8(b)
                        .ok()
                        .and_then(|s| s.split_once(' ')?.0.parse::<Digest>().ok())
                        .is_some_and(|d| store.blobs.contains(&d))
                });
            }
            // Scans are small and keyed by content: kept for the next SBOM.
            Bucket::Sbom => {}
            // The context listings no-op builds take, and the last builds' records (what a
            // miss's reason compares with), are kept for the next build, unless all goes.
            Bucket::Listings => {
                if opts.all {
                    store.memo(bucket).clear();
                }
            }
            // Failed steps' states are kept for debugging until the next prune.
            Bucket::Failures => {
                let _ = fs::remove_dir_all(store.dir(bucket));
            }
            // The records of the builds that made images go with their images.
            Bucket::Builds => {
                if opts.all {
                    store.memo(bucket).clear();
                } else {
                    store.memo(bucket).retain_keys(|key| {
                        crate::store::image_of_build_record(key)
                            .is_none_or(|image| store.blobs.contains(&image))
                    });
                }
            }
            Bucket::Snapshots => {
                let pruning =
                    opts.all || opts.keep_storage.is_some() || opts.older_than_secs.is_some();
                if let Ok(rd) = fs::read_dir(store.dir(bucket)) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if !live_chains.contains(&name)
                            && pruning
                            && fs::remove_dir_all(e.path()).is_ok()
                        {
                            pruned.snapshots += 1;
                        }
                    }
                }
            }
            // No build is running: leftovers of killed builds can go.
            Bucket::Tmp => {
                if let Ok(rd) = fs::read_dir(store.dir(bucket)) {
                    for e in rd.flatten() {
                        pruned.scratch_bytes += crate::store::remove_counting(&e.path());
                    }
                }
            }
            // Attestations belong to their image; `RUN --mount=type=cache` contents are the
            // user's, as BuildKit keeps them.
            Bucket::Attested | Bucket::CacheMounts => {}
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GB"), Some(10_000_000_000));
        assert_eq!(parse_size("512mb"), Some(512_000_000));
        assert_eq!(parse_size("100k"), Some(100_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
    }
}
