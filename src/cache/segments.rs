//! Tar segments of earlier layers (see [`crate::oci::segments`]), so that rewriting a COPY of
//! many small files reads only the files of the segments that changed.
//!
//! A segment is `segments/<k0k1>/<key>`: the BLAKE3 hash of its bytes, then the bytes. A
//! file that is cut short or damaged does not match its hash and is not used, so segments
//! are written without syncing. Each layer that was written with segments lists their keys
//! in `segments/layers/<blob>`; `cache prune` drops the lists of layers that are gone, and
//! then the segments no list names.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::oci::blobs::{replace_unsynced, replace_unsynced_parts, BlobStore};
use crate::oci::digest::Digest;
use crate::oci::segments::{SegmentKey, SegmentStore};

fn list_path(dir: &Path, blob: &Digest) -> PathBuf {
    dir.join("layers").join(blob.hex())
}

/// The segments of a store (its segments bucket).
pub struct SegmentDir {
    dir: PathBuf,
}

impl SegmentDir {
    pub fn open(dir: &Path) -> SegmentDir {
        SegmentDir {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, key: &SegmentKey) -> PathBuf {
        let hex = hex::encode(key);
        self.dir.join(&hex[..2]).join(hex)
    }

    #[cfg(test)]
    fn contains(&self, key: &SegmentKey) -> bool {
        fs::symlink_metadata(self.path(key)).is_ok_and(|m| m.is_file())
    }
}

impl SegmentStore for SegmentDir {
    fn read_into(&self, key: &SegmentKey, buf: &mut Vec<u8>) -> bool {
        buf.clear();
        let read = (|| {
            let mut f = fs::File::open(self.path(key)).ok()?;
            let mut check = [0u8; 32];
            f.read_exact(&mut check).ok()?;
            let len = f.metadata().ok()?.len().checked_sub(32)?;
            buf.reserve(usize::try_from(len).ok()?);
            f.read_to_end(buf).ok()?;
            (blake3::hash(buf).as_bytes() == &check).then_some(())
        })();
        if read.is_none() {
            buf.clear();
        }
        read.is_some()
    }

    fn put(&self, key: &SegmentKey, bytes: &[u8]) {
        let check = blake3::hash(bytes);
        let _ = replace_unsynced_parts(&self.path(key), &[check.as_bytes(), bytes]);
    }
}

/// Record which segments the layer `blob` was written with, so that pruning keeps them while
/// the layer is stored.
pub fn remember(dir: &Path, blob: &Digest, keys: &[SegmentKey]) {
    if keys.is_empty() {
        return;
    }
    let mut text = String::with_capacity(keys.len() * 65);
    for k in keys {
        text.push_str(&hex::encode(k));
        text.push('\n');
    }
    let _ = replace_unsynced(&list_path(dir, blob), text.as_bytes());
}

/// Drop the lists of layers the store no longer holds, then every segment no list names
/// (or all of them with `everything`). What `cache prune` calls after removing blobs, with no
/// build running. Returns the bytes freed.
pub fn forget_missing(dir: &Path, blobs: &BlobStore, everything: bool) -> u64 {
    let root = dir;
    let mut named: BTreeSet<String> = BTreeSet::new();
    if let Ok(rd) = fs::read_dir(root.join("layers")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let kept = !everything
                && format!("sha256:{}", name)
                    .parse::<Digest>()
                    .is_ok_and(|d| blobs.contains(&d));
            if !kept {
                let _ = fs::remove_file(e.path());
                continue;
            }
            if let Ok(text) = fs::read_to_string(e.path()) {
                named.extend(text.lines().map(str::to_string));
            }
        }
    }
    let mut freed = 0;
    let Ok(rd) = fs::read_dir(root) else {
        return 0;
    };
    for fan in rd.flatten() {
        if fan.file_name() == "layers" || !fan.path().is_dir() {
            continue;
        }
        let Ok(files) = fs::read_dir(fan.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !named.contains(&name) {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(f.path()).is_ok() {
                    freed += size;
                }
            }
        }
        let _ = fs::remove_dir(fan.path());
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_or_cut_segment_is_not_used() {
        let t = tempfile::tempdir().unwrap();
        let s = SegmentDir::open(t.path());
        let key = [7u8; 32];
        let get = |key| {
            let mut buf = b"left over".to_vec();
            s.read_into(key, &mut buf).then_some(buf)
        };
        assert!(!s.contains(&key));
        s.put(&key, b"tar bytes of a run of entries");
        assert!(s.contains(&key));
        assert_eq!(get(&key).unwrap(), b"tar bytes of a run of entries");
        let path = s.path(&key);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(get(&key), None, "a flipped bit is refused");
        fs::write(&path, &bytes[..20]).unwrap();
        assert_eq!(get(&key), None, "a cut file is refused");
    }

    #[test]
    fn pruning_keeps_the_segments_of_stored_layers_only() {
        let t = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&t.path().join("blobs"), &t.path().join("tmp")).unwrap();
        let kept = blobs.put(b"a stored layer").unwrap();
        let gone: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let s = SegmentDir::open(t.path());
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        for k in [&a, &b, &c] {
            s.put(k, b"bytes");
        }
        remember(t.path(), &kept, &[a, b]);
        remember(t.path(), &gone, &[b, c]);
        assert!(forget_missing(t.path(), &blobs, false) > 0);
        assert!(s.contains(&a) && s.contains(&b));
        assert!(!s.contains(&c), "only the layer that is gone named it");
        assert!(!list_path(t.path(), &gone).exists());
        forget_missing(t.path(), &blobs, true);
        assert!(!s.contains(&a) && !s.contains(&b));
    }
}
