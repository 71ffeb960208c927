//! Runs of small entries of a tree's tar, kept to be written again without reading their
//! files.
//!
//! Reading a file costs a few system calls whatever its size, so a tar of many small files
//! is bound by opening them, even when all but one are unchanged. A tree whose files' content
//! digests are known (a COPY from the context: its cache key took them) is cut into
//! segments: runs of directories, links and files of at most [`SMALL_ENTRY`] bytes, ended
//! where a path's hash says (so an edit moves no other boundary) or at [`SEGMENT_MAX`]
//! bytes. A segment's key hashes everything its tar bytes are made of (names, modes,
//! owners, clamped mtimes, link targets, xattrs and the content digests), so the bytes a
//! segment's key was stored with are the bytes its entries would be written as. A rewrite
//! takes each stored segment whole: one read instead of one per file.
//!
//! The tar's bytes are the same either way, so the layer's diff_id, its chunks and its blob
//! do not depend on what was stored.

use std::io::{self, Write};

use super::tree::{LayerTree, NodeKind, TreeKey, TreeNode};

/// The key of a segment: a BLAKE3 hash of what its tar bytes are made of.
pub type SegmentKey = [u8; 32];

/// Where segments written before are kept.
pub trait SegmentStore: Sync {
    /// Read the tar bytes stored under `key` into `buf` (cleared first), checked against
    /// what was stored; false if they are gone or damaged.
    fn read_into(&self, key: &SegmentKey, buf: &mut Vec<u8>) -> bool;
    /// Keep `bytes` under `key`. Losing them only costs a later rewrite its reads.
    fn put(&self, key: &SegmentKey, bytes: &[u8]);
}

/// Files up to this size may be in a segment (bigger ones cost one open for many bytes).
pub const SMALL_ENTRY: u64 = 64 << 10;
/// A segment ends after an entry whose path hashes to a multiple of this.
pub const SEGMENT_CUT_ONE_IN: u64 = 64;
/// A segment ends once its entries hold this many bytes.
pub const SEGMENT_MAX: u64 = 4 << 20;
/// Runs of fewer entries are written as they are, never stored.
pub const SEGMENT_MIN_ENTRIES: usize = 8;
/// Changes whenever the way entries become tar bytes does.
const SEGMENT_FORMAT: &[u8] = b"builder tar segment v1\0";

/// A run of nodes (by their index in the tree's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub end: usize,
    pub key: SegmentKey,
}

/// The bytes an entry's data takes (0 for directories and links).
fn data_len(node: &TreeNode) -> u64 {
    match &node.kind {
        NodeKind::File { size, .. } => *size,
        NodeKind::Data(d) => d.len() as u64,
        NodeKind::Dir | NodeKind::Symlink(_) | NodeKind::HardLink(_) => 0,
    }
}

fn in_segment(node: &TreeNode) -> bool {
    let known = !matches!(&node.kind, NodeKind::File { content: None, .. });
    known && data_len(node) <= SMALL_ENTRY
}

/// Whether a segment ends after the entry at `path` (by its path alone).
fn cuts_after(path: &TreeKey) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let h = blake3::hash(path.as_path().as_os_str().as_bytes());
    let b = h.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        .is_multiple_of(SEGMENT_CUT_ONE_IN)
}

/// One entry, as it goes into its segment's key: length-prefixed fields, so no two entries
/// encode alike.
fn key_entry(h: &mut blake3::Hasher, path: &TreeKey, node: &TreeNode, mtime: i64) {
    use std::os::unix::ffi::OsStrExt;
    let field = |h: &mut blake3::Hasher, bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(h, path.as_path().as_os_str().as_bytes());
    h.update(&node.mode.to_le_bytes());
    h.update(&node.uid.to_le_bytes());
    h.update(&node.gid.to_le_bytes());
    h.update(&mtime.to_le_bytes());
    h.update(&(node.xattrs.len() as u64).to_le_bytes());
    for (k, v) in &node.xattrs {
        field(h, k.as_bytes());
        field(h, v);
    }
    match &node.kind {
        NodeKind::Dir => {
            h.update(b"d");
        }
        NodeKind::Symlink(t) => {
            h.update(b"s");
            field(h, t.as_os_str().as_bytes());
        }
        NodeKind::HardLink(t) => {
            h.update(b"h");
            field(h, t.as_os_str().as_bytes());
        }
        NodeKind::Data(bytes) => {
            h.update(b"b");
            field(h, bytes);
        }
        NodeKind::File { size, content, .. } => {
            h.update(b"f");
            h.update(&size.to_le_bytes());
            h.update(content.as_ref().map(|c| &c[..]).unwrap_or(&[]));
        }
    }
}

/// The entry's mtime as the tar records it.
pub fn clamped_mtime(node: &TreeNode, epoch: Option<i64>) -> i64 {
    match epoch {
        Some(e) => node.mtime.min(e).max(0),
        None => node.mtime.max(0),
    }
}

/// Cut `tree` into segments (nodes outside every segment are written as usual).
pub fn plan(tree: &LayerTree, epoch: Option<i64>) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut open: Option<(usize, blake3::Hasher, u64)> = None;
    let mut close = |open: &mut Option<(usize, blake3::Hasher, u64)>, end: usize| {
        if let Some((start, h, _)) = open.take() {
            if end - start >= SEGMENT_MIN_ENTRIES {
                out.push(Segment {
                    start,
                    end,
                    key: *h.finalize().as_bytes(),
                });
            }
        }
    };
    for (i, (path, node)) in tree.nodes.iter().enumerate() {
        if !in_segment(node) {
            close(&mut open, i);
            continue;
        }
        let (_, h, bytes) = open.get_or_insert_with(|| {
            let mut h = blake3::Hasher::new();
            h.update(SEGMENT_FORMAT);
            (i, h, 0)
        });
        key_entry(h, path, node, clamped_mtime(node, epoch));
        *bytes += 512 + data_len(node);
        if cuts_after(path) || *bytes >= SEGMENT_MAX {
            close(&mut open, i + 1);
        }
    }
    close(&mut open, tree.nodes.len());
    out
}

/// A writer that also keeps what goes through it while asked to.
pub struct Capture<W> {
    pub inner: W,
    kept: Option<Vec<u8>>,
}

impl<W: Write> Capture<W> {
    pub fn new(inner: W) -> Self {
        Capture { inner, kept: None }
    }
    pub fn start(&mut self) {
        self.kept = Some(Vec::new());
    }
    /// What went through since [`Capture::start`].
    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.kept.take()
    }
}

impl<W: Write> Write for Capture<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(k) = self.kept.as_mut() {
            k.extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
