//! The store's directory layout, in one place: every directory under `--root` is a
//! [`Bucket`], every single file a [`StoreFile`]. Nothing else joins paths onto the store's
//! root; modules below the store (the worker, the registry client, the blob store) are handed
//! the directories they own. A bucket's on-disk name carries its format version: a change to
//! what a bucket holds bumps the version, and the old directory is simply no longer read
//! (gc removes it).
//!
//! `cache::gc` matches on every bucket, so a new bucket does not compile until gc says what
//! becomes of it.

use std::fs;
use std::path::{Path, PathBuf};

/// A directory of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// Content-addressed blobs (`sha256/<hex>`), and their temporary files.
    Blobs,
    /// Scratch of running builds, named after their process (see `oci::blobs::scratch_prefix`).
    Tmp,
    /// Unpacked layer chains, by chain id, that RUN steps and COPY read.
    Snapshots,
    /// Step cache entries: a key's image state.
    Steps,
    /// Gzip chunk tables of layers, so an edited layer recompresses only what changed.
    Chunks,
    /// Tar segments of layers, reused by the next layer with the same entries.
    Segments,
    /// Context listings of earlier reads, which a no-op build takes instead of walking.
    Listings,
    /// Memo: a provenance statement's digest and size, by what it was made of.
    Statements,
    /// Memo: SBOM scans of layers, by diff_id.
    Sbom,
    /// Memo: a layer compressed again (`--force-compression`), by source and compression.
    Converted,
    /// Attestation manifests of images, by image manifest digest.
    Attested,
    /// Which registry repositories hold a blob.
    Origins,
    /// Descriptors of layers left at their registry (lazy pulls).
    Lazy,
    /// `RUN --mount=type=cache` directories, by id.
    CacheMounts,
    /// Memo: the last build's steps, by build file, target, context and platform (what a
    /// cache miss's reason compares with).
    Builds,
    /// The states of the last failed RUN steps, by id (`builder debug shell`).
    Failures,
}

impl Bucket {
    /// Every bucket, for gc and `fsck`.
    pub const ALL: [Bucket; 16] = [
        Bucket::Blobs,
        Bucket::Tmp,
        Bucket::Snapshots,
        Bucket::Steps,
        Bucket::Chunks,
        Bucket::Segments,
        Bucket::Listings,
        Bucket::Statements,
        Bucket::Sbom,
        Bucket::Converted,
        Bucket::Attested,
        Bucket::Origins,
        Bucket::Lazy,
        Bucket::CacheMounts,
        Bucket::Builds,
        Bucket::Failures,
    ];

    /// The bucket's path under the root, without its version.
    fn name(self) -> &'static str {
        match self {
            Bucket::Blobs => "blobs",
            Bucket::Tmp => "tmp",
            Bucket::Snapshots => "snapshots",
            Bucket::Steps => "cache/steps",
            Bucket::Chunks => "cache/chunks",
            Bucket::Segments => "cache/segments",
            Bucket::Listings => "cache/listings",
            Bucket::Statements => "cache/statements",
            Bucket::Sbom => "cache/sbom",
            Bucket::Converted => "converted",
            Bucket::Attested => "attested",
            Bucket::Origins => "registry/origins",
            Bucket::Lazy => "registry/lazy",
            Bucket::CacheMounts => "cache-mounts",
            Bucket::Builds => "cache/builds",
            Bucket::Failures => "debug/failures",
        }
    }

    /// The format version of what the bucket holds. Version 0 is the unsuffixed name every
    /// store so far has; version N is `<name>-vN`.
    fn version(self) -> u32 {
        0
    }

    /// The bucket's path relative to the store root.
    pub fn relative(self) -> PathBuf {
        match self.version() {
            0 => PathBuf::from(self.name()),
            v => PathBuf::from(format!("{}-v{}", self.name(), v)),
        }
    }
}

/// A single file of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFile {
    /// Serialises reference updates.
    Lock,
    /// Held shared by builds, exclusive by `cache prune`.
    GcLock,
    /// Image names and their manifest digests.
    Refs,
    /// The context hasher's stat cache.
    ContextStats,
    /// This boot and device, when overlayfs mounted here.
    OverlayProbe,
}

impl StoreFile {
    fn relative(self) -> &'static str {
        match self {
            StoreFile::Lock => "lock",
            StoreFile::GcLock => "gc.lock",
            StoreFile::Refs => "refs.json",
            StoreFile::ContextStats => "cache/stat.bin",
            StoreFile::OverlayProbe => "cache/overlay-probe",
        }
    }
}

/// The layout of one store root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }

    pub fn dir(&self, bucket: Bucket) -> PathBuf {
        self.root.join(bucket.relative())
    }

    pub fn file(&self, file: StoreFile) -> PathBuf {
        self.root.join(file.relative())
    }

    pub fn memo(&self, bucket: Bucket) -> Memo {
        Memo {
            dir: self.dir(bucket),
        }
    }
}

/// A directory of small records by key, each replaced atomically: what a bucket that
/// remembers a computed answer is. A lost or damaged record only costs the computation again.
#[derive(Debug, Clone)]
pub struct Memo {
    dir: PathBuf,
}

/// The name, in [`Bucket::Builds`], of the record of the build that made the image
/// `manifest` (its steps' results are beside it, with `.steps` added).
pub fn image_build_record(manifest: &crate::oci::digest::Digest) -> String {
    format!("image-{}", manifest.hex())
}

/// The image a record named by [`image_build_record`] (or its `.steps`) is of.
pub fn image_of_build_record(key: &str) -> Option<crate::oci::digest::Digest> {
    let hex = key.strip_prefix("image-")?;
    let hex = hex.strip_suffix(".steps").unwrap_or(hex);
    format!("sha256:{}", hex).parse().ok()
}

impl Memo {
    /// The record of `key` (a file name: a digest's hex, or such).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        fs::read(self.dir.join(key)).ok()
    }

    /// Whether there is a record of `key`.
    pub fn has(&self, key: &str) -> bool {
        self.dir.join(key).is_file()
    }

    /// Remember `bytes` for `key`, replaced atomically but not synced: a write lost in a
    /// crash only costs the computation again.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let _ = fs::create_dir_all(&self.dir);
        let _ = crate::oci::blobs::replace_unsynced(&self.dir.join(key), bytes);
    }

    /// Make `to` a second name of the record `from` as it is now: a later `put` of `from`
    /// replaces `from` alone. Returns whether `from` was there.
    pub fn link(&self, from: &str, to: &str) -> bool {
        let staged = self
            .dir
            .join(format!(".{}.{}.link", to, std::process::id()));
        let (from, to) = (self.dir.join(from), self.dir.join(to));
        let _ = fs::remove_file(&staged);
        fs::hard_link(&from, &staged).is_ok() && fs::rename(&staged, &to).is_ok()
    }

    /// Keep only the records whose key `keep` accepts; returns how many went.
    pub fn retain_keys(&self, mut keep: impl FnMut(&str) -> bool) -> usize {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut gone = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep(&name) && fs::remove_file(e.path()).is_ok() {
                gone += 1;
            }
        }
        gone
    }

    /// Keep only the records `still` says are still true; returns how many went.
    pub fn retain(&self, mut still: impl FnMut(&[u8]) -> bool) -> usize {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut gone = 0;
        for e in rd.flatten() {
            let keep = fs::read(e.path()).is_ok_and(|b| still(&b));
            if !keep && fs::remove_file(e.path()).is_ok() {
                gone += 1;
            }
        }
        gone
    }

    /// Forget every record.
    pub fn clear(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_have_distinct_places_and_memos_round_trip() {
        let names: std::collections::BTreeSet<PathBuf> =
            Bucket::ALL.iter().map(|b| b.relative()).collect();
        assert_eq!(names.len(), Bucket::ALL.len());
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(layout.dir(Bucket::Steps), dir.path().join("cache/steps"));
        let memo = layout.memo(Bucket::Converted);
        assert_eq!(memo.get("a"), None);
        memo.put("a", b"1");
        memo.put("b", b"2");
        assert_eq!(memo.get("a").as_deref(), Some(&b"1"[..]));
        assert!(memo.link("a", "c"));
        memo.put("a", b"3");
        assert_eq!(memo.get("c").as_deref(), Some(&b"1"[..]));
        assert!(!memo.link("nothing", "d"));
        assert_eq!(memo.retain_keys(|k| k != "c"), 1);
        assert_eq!(memo.retain(|b| b == b"2"), 1);
        assert_eq!(memo.get("a"), None);
        memo.clear();
        assert_eq!(memo.get("b"), None);
    }
}
