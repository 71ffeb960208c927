//! `RUN --mount=type=cache` contents travelling with a remote cache. A mount's files are
//! packed into several gzip tar layers, cut where the paths say (content-defined: a group
//! ends at a path whose hash hits, once it holds enough bytes), so that a file changed,
//! added or removed changes its group's layer (and the next one, when its size moves that
//! cut), and a re-export uploads only those.
//! Newest files go first under a size bound; the oldest are left out. Restoring unpacks the
//! layers, verified, inside the mount's directory.
//!
//! A cache mount is a cache, never an input: nothing here enters a key or an image layer.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::oci::blobs::BlobStore;
use crate::oci::digest::Digest;
use crate::oci::image::LayerRef;
use crate::oci::unpack::{self, UnpackOptions};

/// The media type of a packed group.
pub const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A group closes at a path whose hash is 0 modulo this, once it holds [`GROUP_BYTES`].
const CUT_MODULUS: u64 = 4;
const GROUP_BYTES: u64 = 4 << 20;

/// The default bound of one mount's export (`cache-mounts-max`).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// One entry of a mount's tree.
struct Entry {
    rel: PathBuf,
    meta: fs::Metadata,
}

/// Pack the mount at `dir` into layers in `blobs`, newest files first up to `max_bytes`.
pub fn pack(dir: &Path, max_bytes: u64, blobs: &BlobStore) -> Result<Vec<LayerRef>, String> {
    let mut files = Vec::new();
    for e in walkdir::WalkDir::new(dir).min_depth(1).follow_links(false) {
        let e = e.map_err(|e| format!("{}: {}", dir.display(), e))?;
        let meta = e
            .metadata()
            .map_err(|err| format!("{}: {}", e.path().display(), err))?;
        if meta.is_dir() {
            continue;
        }
        let rel = e
            .path()
            .strip_prefix(dir)
            .map_err(|err| err.to_string())?
            .to_path_buf();
        files.push(Entry { rel, meta });
    }
    // Under the bound, the newest stay.
    files.sort_by(|a, b| b.meta.mtime().cmp(&a.meta.mtime()).then(a.rel.cmp(&b.rel)));
    let mut total = 0u64;
    files.retain(|f| {
        total += f.meta.len();
        total <= max_bytes
    });
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut layers = Vec::new();
    let mut group: Vec<&Entry> = Vec::new();
    let mut bytes = 0u64;
    for f in &files {
        group.push(f);
        bytes += f.meta.len();
        let cut = Digest::of(f.rel.as_os_str().as_encoded_bytes());
        let hit = u64::from_str_radix(&cut.hex()[..8], 16)
            .unwrap_or(0)
            .is_multiple_of(CUT_MODULUS);
        if bytes >= GROUP_BYTES && hit {
            layers.push(write_group(dir, &group, blobs)?);
            group.clear();
            bytes = 0;
        }
    }
    if !group.is_empty() {
        layers.push(write_group(dir, &group, blobs)?);
    }
    Ok(layers)
}

/// One group as a gzip tar layer: each file with the directories above it, as they are.
fn write_group(dir: &Path, group: &[&Entry], blobs: &BlobStore) -> Result<LayerRef, String> {
    let mut tar_bytes = Vec::new();
    {
        let mut tar = tar::Builder::new(&mut tar_bytes);
        tar.mode(tar::HeaderMode::Complete);
        let mut dirs_done = std::collections::BTreeSet::new();
        for f in group {
            let mut parents: Vec<&Path> = f.rel.ancestors().skip(1).collect();
            parents.reverse();
            for p in parents.into_iter().filter(|p| !p.as_os_str().is_empty()) {
                if dirs_done.insert(p.to_path_buf()) {
                    let meta = fs::symlink_metadata(dir.join(p)).map_err(|e| e.to_string())?;
                    append(&mut tar, dir, p, &meta)?;
                }
            }
            append(&mut tar, dir, &f.rel, &f.meta)?;
        }
        tar.finish().map_err(|e| e.to_string())?;
    }
    let diff_id = Digest::from_hasher({
        let mut h = Sha256::new();
        h.update(&tar_bytes);
        h
    });
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_bytes).map_err(|e| e.to_string())?;
    let compressed = gz.finish().map_err(|e| e.to_string())?;
    let digest = blobs.put(&compressed).map_err(|e| e.to_string())?;
    Ok(LayerRef {
        digest,
        diff_id,
        size: compressed.len() as u64,
        media_type: MEDIA_TYPE.to_string(),
    })
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    meta: &fs::Metadata,
) -> Result<(), String> {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header.set_mtime(meta.mtime().max(0) as u64);
    let path = dir.join(rel);
    let fail = |e: std::io::Error| format!("{}: {}", path.display(), e);
    if meta.file_type().is_symlink() {
        let target = fs::read_link(&path).map_err(fail)?;
        header.set_size(0);
        tar.append_link(&mut header, rel, &target).map_err(fail)
    } else if meta.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, rel, std::io::empty())
            .map_err(fail)
    } else if meta.is_file() {
        let file = fs::File::open(&path).map_err(fail)?;
        header.set_size(meta.len());
        tar.append_data(&mut header, rel, file).map_err(fail)
    } else {
        // Sockets, FIFOs and devices are not a cache's content.
        Ok(())
    }
}

/// Unpack `layers` (in `blobs`, fetched as needed) into the mount at `dir`, verified.
pub fn restore(layers: &[LayerRef], dir: &Path, blobs: &BlobStore) -> Result<(), String> {
    for l in layers {
        let blob = blobs.ensure(&l.digest).map_err(|e| e.to_string())?;
        unpack::unpack_verified(
            &blob,
            &l.digest.to_string(),
            dir,
            UnpackOptions {
                devices: false,
                ownership: nix::unistd::geteuid().is_root(),
                overlay_format: false,
                metadata_only: false,
                user_xattrs: false,
                capability_xattr_only: false,
            },
            &l.diff_id,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, n: usize, size: usize, tag: &str) {
        for i in 0..n {
            let p = dir.join(format!("pkg/{:03}/{}.bin", i % 7, i));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, format!("{tag}{i}").repeat(size / 4)).unwrap();
        }
    }

    #[test]
    fn a_changed_file_changes_one_group_and_a_restore_gives_the_files_back() {
        let t = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&t.path().join("blobs"), &t.path().join("tmp")).unwrap();
        let dir = t.path().join("mount");
        files(&dir, 400, 64 << 10, "x");
        let first = pack(&dir, DEFAULT_MAX_BYTES, &blobs).unwrap();
        assert!(first.len() > 2, "{} groups", first.len());
        // Same content, same layers.
        assert_eq!(pack(&dir, DEFAULT_MAX_BYTES, &blobs).unwrap(), first);
        // One file changed: one group differs.
        fs::write(dir.join("pkg/003/200.bin"), "changed").unwrap();
        let second = pack(&dir, DEFAULT_MAX_BYTES, &blobs).unwrap();
        let new: Vec<_> = second.iter().filter(|l| !first.contains(l)).collect();
        assert!(
            !new.is_empty() && new.len() <= 2,
            "{} of {} groups changed",
            new.len(),
            second.len()
        );
        // Restored elsewhere: the same files.
        let back = t.path().join("back");
        fs::create_dir_all(&back).unwrap();
        restore(&second, &back, &blobs).unwrap();
        assert_eq!(
            fs::read(back.join("pkg/003/200.bin")).unwrap(),
            b"changed".to_vec()
        );
        assert_eq!(
            fs::read(back.join("pkg/001/8.bin")).unwrap(),
            fs::read(dir.join("pkg/001/8.bin")).unwrap()
        );
        // A bound keeps the newest.
        let small = pack(&dir, 64 << 10, &blobs).unwrap();
        assert_eq!(small.len(), 1);
    }
}
