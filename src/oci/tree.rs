//! A layer described in memory: the entries COPY, ADD and WORKDIR make, keyed by their
//! path in the image and ordered as the tar writes them. The layer writer streams it, and
//! segments cut it into reusable pieces.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One entry of a [`LayerTree`].
#[derive(Debug, Clone)]
pub struct TreeNode {
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What a [`TreeNode`] is.
#[derive(Debug, Clone)]
pub enum NodeKind {
    Dir,
    /// A regular file whose bytes are read from `source` when the layer is written.
    File {
        source: PathBuf,
        size: u64,
        /// The sha256 of its bytes, when the step's key took it (a COPY from the context).
        content: Option<[u8; 32]>,
    },
    Data(Vec<u8>),
    Symlink(PathBuf),
    /// A second name for the file at this layer path (written after it).
    HardLink(PathBuf),
}

/// A layer described in memory (paths relative to the image root): COPY and ADD build one,
/// and the tar is streamed straight from the source files without a staging copy. The map's
/// order (component-wise) is the depth-first, name-sorted order of the tar.
#[derive(Debug, Default)]
pub struct LayerTree {
    pub nodes: std::collections::BTreeMap<TreeKey, TreeNode>,
}

/// A path of a [`LayerTree`] (relative, normalised), ordered as `Path` orders it, component
/// by component. For normal paths that is byte order with `/` below every other byte, which
/// compares at memory speed: a COPY of many files inserts every one into the tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreeKey(PathBuf);

impl TreeKey {
    /// The key of `path`, its components kept (`a//b/./c/` is `a/b/c`).
    pub fn new(path: impl Into<PathBuf>) -> TreeKey {
        let path: PathBuf = path.into();
        let bytes = path.as_os_str().as_bytes();
        let clean = !bytes.starts_with(b"/")
            && !bytes.starts_with(b"./")
            && !bytes.ends_with(b"/")
            && !bytes.windows(2).any(|w| w == b"//")
            && !bytes.windows(3).any(|w| w == b"/./")
            && !bytes.ends_with(b"/.");
        if clean && bytes != b"." {
            return TreeKey(path);
        }
        TreeKey(
            path.components()
                .filter(|c| {
                    matches!(
                        c,
                        std::path::Component::Normal(_) | std::path::Component::ParentDir
                    )
                })
                .collect(),
        )
    }

    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TreeKey {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Ord for TreeKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (
            self.0.as_os_str().as_bytes(),
            other.0.as_os_str().as_bytes(),
        );
        let n = a.len().min(b.len());
        let at = a[..n]
            .iter()
            .zip(&b[..n])
            .position(|(x, y)| x != y)
            .unwrap_or(n);
        // Where they part: an end sorts first, then `/` (a component ends), then any byte.
        let rank = |s: &[u8]| s.get(at).map(|&c| if c == b'/' { 0 } else { c as u16 + 1 });
        rank(a).cmp(&rank(b))
    }
}

impl PartialOrd for TreeKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
