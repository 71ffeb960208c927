//! Compressed chunks of earlier layers, for a step that writes a layer again (an edited COPY,
//! a RUN whose output barely changed). Each gzip layer's chunk table (`tables/<blob>`: the
//! key and CRC of each chunk's uncompressed bytes and where its compressed bytes sit in the
//! blob)
//! is kept, and each step (by platform and instruction) remembers its last layer
//! (`steps/<id>`). A rewrite reads unchanged chunks straight from that blob: nothing is
//! copied, and a blob that is gone only means compressing again.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::oci::blobs::{write_atomic, BlobStore};
use crate::oci::digest::Digest;
use crate::oci::layer::Layer;
use crate::oci::pgzip::{ChunkInfo, ChunkReuse};

#[derive(serde::Serialize, serde::Deserialize)]
struct Table {
    /// How chunks are keyed ([`KEYED_BY`]); a table written otherwise (or before) is not
    /// read.
    #[serde(default)]
    keyed: String,
    level: u32,
    chunks: Vec<ChunkInfo>,
}

/// The hash of [`crate::oci::pgzip::chunk_key`], and how a chunk is compressed (what
/// [`crate::oci::pgzip::deflate`] stores rather than deflates): a chunk compressed
/// otherwise is not the bytes a compression gives now.
const KEYED_BY: &str = "blake3, stored windows";

fn step_path(dir: &Path, step: &str) -> PathBuf {
    dir.join("steps").join(Digest::of(step.as_bytes()).hex())
}

fn table_path(dir: &Path, blob: &Digest) -> PathBuf {
    dir.join("tables").join(blob.hex())
}

/// The chunks of the last layer `step` wrote, when it is still stored.
pub struct PreviousChunks {
    blob: PathBuf,
    level: u32,
    /// Chunk key -> (offset, size) in `blob`, and the CRC of the uncompressed bytes.
    index: HashMap<String, (u64, u64, u32)>,
}

impl PreviousChunks {
    pub fn of_step(dir: &Path, blobs: &BlobStore, step: &str) -> Option<PreviousChunks> {
        let text = fs::read_to_string(step_path(dir, step)).ok()?;
        let blob: Digest = text.trim().parse().ok()?;
        if !blobs.contains(&blob) {
            return None;
        }
        let table: Table = serde_json::from_slice(&fs::read(table_path(dir, &blob)).ok()?).ok()?;
        if table.keyed != KEYED_BY {
            return None;
        }
        let index = table
            .chunks
            .into_iter()
            .map(|c| (c.key, (c.offset, c.size, c.crc)))
            .collect();
        Some(PreviousChunks {
            blob: blobs.path(&blob),
            level: table.level,
            index,
        })
    }
}

impl ChunkReuse for PreviousChunks {
    fn compressed(&self, key: &str, level: u32) -> Option<(Vec<u8>, u32)> {
        if level != self.level {
            return None;
        }
        let &(offset, size, crc) = self.index.get(key)?;
        let mut f = fs::File::open(&self.blob).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        let mut out = vec![0u8; usize::try_from(size).ok()?];
        f.read_exact(&mut out).ok()?;
        Some((out, crc))
    }
}

/// Remember `layer` (gzip at `level`) as what `step` wrote last. Losing this only costs a
/// later rewrite its reuse, so failures are ignored.
pub fn remember(dir: &Path, step: &str, layer: &Layer, level: u32) {
    if layer.chunks.is_empty() {
        return;
    }
    let table = Table {
        keyed: KEYED_BY.to_string(),
        level,
        chunks: layer.chunks.clone(),
    };
    let tp = table_path(dir, &layer.digest);
    let sp = step_path(dir, step);
    for p in [&tp, &sp] {
        if let Some(parent) = p.parent() {
            let _ = fs::create_dir_all(parent);
        }
    }
    if !tp.exists() {
        if let Ok(bytes) = serde_json::to_vec(&table) {
            let _ = write_atomic(&tp, &bytes);
        }
    }
    let _ = write_atomic(&sp, layer.digest.to_string().as_bytes());
}

/// Remove the tables of blobs that are gone (what `cache prune` calls after removing blobs).
pub fn forget_missing(dir: &Path, blobs: &BlobStore) {
    let Ok(rd) = fs::read_dir(dir.join("tables")) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let gone = format!("sha256:{}", name)
            .parse::<Digest>()
            .map(|d| !blobs.contains(&d))
            .unwrap_or(true);
        if gone {
            let _ = fs::remove_file(e.path());
        }
    }
}
