//! Deterministic layer writing in one pass: a directory tree becomes a tar (entries in sorted
//! depth-first order, fixed header fields, PAX records for long names, big ids and xattrs,
//! hardlinks as links), hashed for the diff_id, compressed, hashed again for the blob digest,
//! written to a temp file and renamed into the blob store.
//!
//! Overlay whiteouts in the tree (0/0 character devices, the `trusted.overlay.opaque` xattr)
//! become OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`), so an overlayfs upper directory can be
//! turned into a layer directly.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::blobs::{BlobError, BlobStore};
use super::digest::{Digest, ThreadedHashingWriter};
use super::segments::SegmentKey;
use super::tar::{append, append_file, COPY_BUFFER};
pub use super::tree::{LayerTree, NodeKind, TreeKey, TreeNode};
use super::Tally;

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip(u32),
    Zstd(i32),
}

impl Compression {
    pub fn media_type(&self) -> &'static str {
        match self {
            Compression::Gzip(_) => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd(_) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// The algorithm and level, as a cache key names them (`gzip:6`, `zstd:3`).
    pub fn key(&self) -> String {
        match self {
            Compression::Gzip(l) => format!("gzip:{}", l),
            Compression::Zstd(l) => format!("zstd:{}", l),
        }
    }
}

/// A layer written to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
    /// A gzip layer's chunks (see [`super::pgzip`]); empty for zstd.
    pub chunks: Vec<super::pgzip::ChunkInfo>,
    /// How many of them came from the reuse source rather than the compressor.
    pub reused: usize,
    /// The segments of its tar (see [`super::segments`]), and how many were stored before.
    pub segments: Vec<super::segments::SegmentKey>,
    pub segments_reused: usize,
    /// Source files whose content was read to write it (a tree's; none for a blob), and
    /// how many bytes: each file once, and none in a stored segment.
    pub files_read: u64,
    pub bytes_read: u64,
}

impl From<Layer> for super::image::LayerRef {
    /// The layer as an image references it (its chunk table stays with the writer).
    fn from(l: Layer) -> Self {
        super::image::LayerRef {
            digest: l.digest,
            diff_id: l.diff_id,
            size: l.size,
            media_type: l.media_type,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Blob(#[from] BlobError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to write a tree.
#[derive(Clone, Copy)]
pub struct LayerOptions<'r> {
    pub compression: Compression,
    /// Clamp every mtime to at most this (the build's SOURCE_DATE_EPOCH).
    pub epoch: Option<i64>,
    /// Compressed chunks of earlier layers that a gzip layer may reuse.
    pub reuse: Option<&'r dyn super::pgzip::ChunkReuse>,
    /// Where a tree's runs of small entries are kept, to be written again without reading
    /// their files.
    pub segments: Option<&'r dyn super::segments::SegmentStore>,
}

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The same marker in the `user.` namespace, which an unprivileged writer can set (overlayfs'
/// `userxattr` mode, and `--isolation container`).
const USER_OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Marks an empty regular file as a whiteout (see `is_user_whiteout`).
pub const USER_WHITEOUT_XATTR: &str = "user.overlay.whiteout";

/// Write the tree under `dir` as a layer into `store`.
pub fn write_layer(store: &BlobStore, dir: &Path, opts: LayerOptions) -> Result<Layer, LayerError> {
    write_layer_from(store, LayerSource::Dir(dir), opts, None)
}

/// Where a layer's tar goes: the compressor, the diff_id's hashing thread (unless the
/// compressor hashes it), and `tee`.
struct TarSink<'t, W: Write> {
    out: W,
    diff_id: Option<ThreadedHashingWriter<io::Sink>>,
    tee: Option<&'t mut dyn Write>,
}

impl<'t, W: Write> TarSink<'t, W> {
    /// `hash`: whether the diff_id is taken here (else `out` takes it).
    fn new(out: W, hash: bool, tee: Option<&'t mut dyn Write>) -> Self {
        TarSink {
            out,
            diff_id: hash.then(|| ThreadedHashingWriter::new(io::sink())),
            tee,
        }
    }
}

impl<W: Write> Write for TarSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        if let Some(h) = self.diff_id.as_mut() {
            h.write_all(buf)?;
        }
        if let Some(t) = self.tee.as_mut() {
            t.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// What a layer is written from.
pub enum LayerSource<'a> {
    /// A directory tree (overlay whiteouts converted).
    Dir(&'a Path),
    /// An in-memory description whose file contents are read from their sources.
    Tree(&'a LayerTree),
    /// The tar inside a layer blob (gzip, zstd or plain), copied as it is.
    Blob(&'a Path),
    /// Layer blobs, lowest first, squashed into one (see [`super::squash`]).
    Squash(&'a [&'a Path]),
}

/// Write a layer from a directory or a tree into `store`; `tee` also sees the uncompressed
/// tar as it is written (to scan it without reading the blob back).
pub fn write_layer_from(
    store: &BlobStore,
    source: LayerSource,
    opts: LayerOptions,
    tee: Option<&mut dyn Write>,
) -> Result<Layer, LayerError> {
    let dir: &Path = match &source {
        LayerSource::Dir(d) | LayerSource::Blob(d) => d,
        LayerSource::Tree(_) | LayerSource::Squash(_) => Path::new("."),
    };
    let (tmp_path, file) = store.temp_file()?;
    let mut chunks = Vec::new();
    let mut reused_chunks = 0;
    let mut segments = Segmented::default();
    let result = (|| {
        // The blob is hashed, and the diff_id computed, on threads of their own, beside
        // the tar writer and the compressors. Few read a new layer's blob back soon: its
        // pages go to disk, and a big one's out of the cache, as it is written.
        let outer = ThreadedHashingWriter::new(super::blobs::WriteBehind::new(file));
        // The diff_id: from the gzip compressor's own chunks, or hashed beside zstd.
        let (diff_id, outer) = match opts.compression {
            Compression::Gzip(level) => {
                let jobs = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                // The compressing threads live as long as this layer's writing.
                std::thread::scope(|scope| -> Result<_, LayerError> {
                    let gz =
                        super::pgzip::ParallelGzWriter::new(scope, outer, level, jobs, opts.reuse)
                            .map_err(io_at(&tmp_path))?
                            .hashing_plain();
                    let sink = TarSink::new(gz, false, tee);
                    let done = write_source(&source, dir, sink, &opts, &mut segments)?;
                    let gz = done.out.finish().map_err(io_at(&tmp_path))?;
                    chunks = gz.table;
                    reused_chunks = gz.reused;
                    Ok((gz.plain_digest, gz.inner))
                })?
            }
            Compression::Zstd(level) => {
                let mut z = zstd::Encoder::new(outer, level).map_err(io_at(&tmp_path))?;
                // zstd's workers give the same frame whatever their number (at least one),
                // so the blob stays the same on any machine.
                let jobs = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                z.multithread(jobs as u32).map_err(io_at(&tmp_path))?;
                let sink = TarSink::new(z, true, tee);
                let done = write_source(&source, dir, sink, &opts, &mut segments)?;
                let diff_id = match done.diff_id {
                    Some(h) => Some(h.finish().map_err(io_at(&tmp_path))?.0),
                    None => None,
                };
                (diff_id, done.out.finish().map_err(io_at(&tmp_path))?)
            }
        };
        let diff_id = diff_id.ok_or_else(|| {
            io_at(&tmp_path)(io::Error::other("internal: the tar was not hashed"))
        })?;
        let (digest, size, file) = outer.finish().map_err(io_at(&tmp_path))?;
        store.commit(&tmp_path, file.into_inner(), &digest)?;
        Ok(Layer {
            digest,
            diff_id,
            size,
            media_type: opts.compression.media_type().to_string(),
            chunks: std::mem::take(&mut chunks),
            reused: reused_chunks,
            segments: std::mem::take(&mut segments.keys),
            segments_reused: segments.reused,
            files_read: segments.reads.get().0,
            bytes_read: segments.reads.get().1,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result
}

fn write_source<W: Write>(
    source: &LayerSource,
    dir: &Path,
    w: W,
    opts: &LayerOptions,
    segmented: &mut Segmented,
) -> Result<W, LayerError> {
    let epoch = opts.epoch;
    match source {
        LayerSource::Dir(_) => write_tar(dir, w, epoch, &segmented.reads),
        LayerSource::Tree(t) => write_tar_tree(t, w, epoch, opts.segments, segmented),
        LayerSource::Blob(p) => {
            let mut w = w;
            let mut r = super::unpack::open_layer(p).map_err(io_at(p))?;
            io::copy(&mut r, &mut w).map_err(io_at(p))?;
            Ok(w)
        }
        LayerSource::Squash(layers) => {
            let at = layers.first().copied().unwrap_or(Path::new("."));
            super::squash::write_squashed(layers, w).map_err(io_at(at))
        }
    }
}

/// The layer `layer` (whose blob is at `blob`) compressed as `compression` says, with the
/// same tar inside: the same diff_id, checked.
pub fn recompress(
    store: &BlobStore,
    layer: &super::image::LayerRef,
    blob: &Path,
    compression: Compression,
) -> Result<super::image::LayerRef, LayerError> {
    let opts = LayerOptions {
        compression,
        epoch: None,
        reuse: None,
        segments: None,
    };
    let out = write_layer_from(store, LayerSource::Blob(blob), opts, None)?;
    if out.diff_id != layer.diff_id {
        return Err(LayerError::Io {
            path: blob.to_path_buf(),
            source: io::Error::other(format!(
                "layer {} holds a tar with diff_id {}, but its image says {}",
                layer.digest, out.diff_id, layer.diff_id
            )),
        });
    }
    Ok(out.into())
}

/// Whether a layer of media type `media_type` is compressed as `compression` would.
pub fn compressed_as(media_type: &str, compression: Compression) -> bool {
    match compression {
        Compression::Gzip(_) => media_type.ends_with("gzip"),
        Compression::Zstd(_) => media_type.ends_with("zstd"),
    }
}

/// What a tree's segments came to (see [`super::segments`]).
#[derive(Default)]
struct Segmented {
    keys: Vec<super::segments::SegmentKey>,
    reused: usize,
    /// The source files read, and their bytes.
    reads: Tally,
}

/// Write the tar stream of a [`LayerTree`] into `w`, taking the segments `segments` holds
/// instead of reading their files, and keeping the ones it does not hold.
fn write_tar_tree<W: Write>(
    tree: &LayerTree,
    w: W,
    epoch: Option<i64>,
    segments: Option<&dyn super::segments::SegmentStore>,
    segmented: &mut Segmented,
) -> Result<W, LayerError> {
    let plan = match segments {
        Some(_) => super::segments::plan(tree, epoch),
        None => Vec::new(),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(PREFETCH_FILES);
    // Segment buffers come back to the reader, to be filled again.
    let (spent_tx, spent) = std::sync::mpsc::channel();
    // New segments are stored on a thread of their own, beside the reader and the writer.
    let (keep, to_keep) = std::sync::mpsc::sync_channel::<(SegmentKey, Vec<u8>)>(4);
    let written = std::thread::scope(|s| {
        // The reader stops when the writer drops `rx` (done, or failed); the keeper, when
        // it drops `keep`.
        let (reads, plan) = (&segmented.reads, &plan);
        s.spawn(move || prefetch_files(tree, plan, segments, tx, spent, reads));
        match segments {
            Some(store) => {
                s.spawn(move || {
                    for (key, bytes) in to_keep {
                        store.put(&key, &bytes);
                    }
                });
            }
            // Nothing is kept (nor sent: without a store there are no segments).
            None => drop(to_keep),
        }
        write_tar_tree_in_order(tree, w, epoch, plan, rx, spent_tx, keep, reads)
    });
    let (w, reused) = written?;
    segmented.keys = plan.iter().map(|s| s.key).collect();
    segmented.reused = reused;
    Ok(w)
}

/// How many files [`prefetch_files`] reads ahead of the writer.
const PREFETCH_FILES: usize = 256;
/// How many stored segments it holds at most (each up to about
/// [`super::segments::SEGMENT_MAX`]).
const SEGMENT_BUFFERS: usize = 4;
/// Files up to this size are read ahead into memory (so at most `PREFETCH_FILES` times this,
/// 16 MiB, is held); bigger ones are opened, and the kernel told to start reading them.
const PREFETCH_IN_MEMORY: u64 = 64 << 10;
/// Nor is reading ahead asked for beyond this size (a huge file is read as it streams).
const PREFETCH_ADVISE_MAX: u64 = 64 << 20;
// Every file of a segment is read into memory, and so checked against its digest.
const _: () = assert!(super::segments::SMALL_ENTRY <= PREFETCH_IN_MEMORY);

/// One source file of a tree, or one stored segment, as the reader ahead found it.
enum Prefetched {
    Bytes(Vec<u8>),
    /// The bytes of a file in a segment, which are not those its content digest names (it
    /// changed since): the segment is written, but not stored.
    Changed(Vec<u8>),
    Opened(fs::File),
    Failed(io::Error),
    /// A stored segment's bytes, sent at its start in place of its files; `None` when it is
    /// not stored (or could not be read), and its files follow.
    Segment(Option<Vec<u8>>),
}

/// Read the tree's source files, in the writer's order, on a thread of their own: the
/// writer then frames and hashes while this one waits on the disk, and a tree whose files
/// are not in the page cache is read with requests in flight instead of one at a time.
/// A stored segment is read whole instead of its files.
fn prefetch_files(
    tree: &LayerTree,
    plan: &[super::segments::Segment],
    store: Option<&dyn super::segments::SegmentStore>,
    tx: std::sync::mpsc::SyncSender<Prefetched>,
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
    reads: &Tally,
) {
    use sha2::Digest as _;
    use std::os::fd::AsRawFd;
    let mut files = super::at::DirCursor::default();
    let mut segments = plan.iter().peekable();
    // Files up to this index are in a stored segment that was read, or in a segment whose
    // files are checked against their digests.
    let mut skip_until = 0;
    let mut check_until = 0;
    let mut buffers = 0;
    // A buffer that a segment not stored left unfilled, for the next one.
    let mut idle: Option<Vec<u8>> = None;
    for (i, node) in tree.nodes.values().enumerate() {
        if let Some(seg) = segments.next_if(|s| s.start == i) {
            // At most SEGMENT_BUFFERS are out: then the next one comes back first.
            let spare = idle.take().or_else(|| spent.try_recv().ok());
            let mut buf = match spare {
                Some(b) => b,
                None if buffers < SEGMENT_BUFFERS => {
                    buffers += 1;
                    Vec::new()
                }
                None => match spent.recv() {
                    Ok(b) => b,
                    Err(_) => return,
                },
            };
            let stored = if store.is_some_and(|st| st.read_into(&seg.key, &mut buf)) {
                skip_until = seg.end;
                Some(buf)
            } else {
                idle = Some(buf);
                None
            };
            if tx.send(Prefetched::Segment(stored)).is_err() {
                return;
            }
            check_until = seg.end;
        }
        if i < skip_until {
            continue;
        }
        let NodeKind::File {
            source,
            size,
            content,
        } = &node.kind
        else {
            continue;
        };
        let got = match files.open_file(source) {
            Err(e) => Prefetched::Failed(e),
            Ok(f) if *size <= PREFETCH_IN_MEMORY => {
                let mut bytes = Vec::with_capacity(*size as usize);
                let read = io::Read::read_to_end(&mut f.take(*size), &mut bytes);
                reads.add(bytes.len() as u64);
                match read {
                    // A segment is stored only with the bytes its key names: a file that
                    // changed since its digest was taken is written, not stored.
                    Ok(_) => match content {
                        Some(c) if i < check_until && sha2::Sha256::digest(&bytes)[..] != c[..] => {
                            Prefetched::Changed(bytes)
                        }
                        _ => Prefetched::Bytes(bytes),
                    },
                    Err(e) => Prefetched::Failed(e),
                }
            }
            Ok(f) => {
                if *size <= PREFETCH_ADVISE_MAX {
                    let _ = nix::fcntl::posix_fadvise(
                        f.as_raw_fd(),
                        0,
                        0,
                        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
                    );
                }
                Prefetched::Opened(f)
            }
        };
        if tx.send(got).is_err() {
            return;
        }
    }
}

/// The segment being written (to be stored once it is whole), and whether one of its files
/// was not what its digest says.
struct Capturing<'p> {
    segment: &'p super::segments::Segment,
    changed: bool,
}

fn write_tar_tree_in_order<W: Write>(
    tree: &LayerTree,
    w: W,
    epoch: Option<i64>,
    plan: &[super::segments::Segment],
    ahead: std::sync::mpsc::Receiver<Prefetched>,
    spent: std::sync::mpsc::Sender<Vec<u8>>,
    keep: std::sync::mpsc::SyncSender<(SegmentKey, Vec<u8>)>,
    reads: &Tally,
) -> Result<(W, usize), LayerError> {
    use super::segments::Capture;
    let mut b = tar::Builder::new(Capture::new(w));
    let mut files = super::at::DirCursor::default();
    let mut segments = plan.iter().peekable();
    let mut capturing: Option<Capturing> = None;
    let mut skip_until = 0;
    let mut reused = 0;
    let mut copier = FileCopier::new(reads);
    let layer_io = |e: io::Error| LayerError::Io {
        path: PathBuf::from("(layer)"),
        source: e,
    };
    // A whole segment is stored (unless one of its files changed under it).
    let close = |b: &mut tar::Builder<Capture<W>>, capturing: &mut Option<Capturing>, at| {
        if let Some(c) = capturing.take_if(|c| c.segment.end == at) {
            let bytes = b.get_mut().take();
            if let (Some(bytes), false) = (bytes, c.changed) {
                // A keeper that is gone (no store) only means it is not kept.
                let _ = keep.send((c.segment.key, bytes));
            }
        }
    };
    for (i, (rel, node)) in tree.nodes.iter().enumerate() {
        close(&mut b, &mut capturing, i);
        if let Some(seg) = segments.next_if(|s| s.start == i) {
            let stored = match ahead.recv() {
                Ok(Prefetched::Segment(bytes)) => bytes,
                // The reader is gone (it cannot be, short of a panic): write the files.
                Err(_) => None,
                Ok(_) => {
                    return Err(layer_io(io::Error::other(
                        "the layer's reader lost its place in the tree",
                    )))
                }
            };
            if let Some(bytes) = stored {
                b.get_mut().write_all(&bytes).map_err(layer_io)?;
                let _ = spent.send(bytes);
                skip_until = seg.end;
                reused += 1;
            } else {
                b.get_mut().start();
                capturing = Some(Capturing {
                    segment: seg,
                    changed: false,
                });
            }
        }
        if i < skip_until {
            continue;
        }
        let at = |e: io::Error| LayerError::Io {
            path: rel.as_path().to_path_buf(),
            source: e,
        };
        let mut h = tar::Header::new_ustar();
        h.set_mode(node.mode & 0o7777);
        h.set_uid(node.uid as u64);
        h.set_gid(node.gid as u64);
        h.set_mtime(super::segments::clamped_mtime(node, epoch) as u64);
        h.set_size(0);
        let mut name = rel.as_os_str().as_bytes().to_vec();
        match &node.kind {
            NodeKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                name.push(b'/');
                append(&mut b, h, &name, None, &node.xattrs, io::empty()).map_err(at)?;
            }
            NodeKind::Symlink(target) | NodeKind::HardLink(target) => {
                h.set_entry_type(if matches!(node.kind, NodeKind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                append(
                    &mut b,
                    h,
                    &name,
                    Some(target.as_os_str().as_bytes()),
                    &node.xattrs,
                    io::empty(),
                )
                .map_err(at)?;
            }
            NodeKind::Data(bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(bytes.len() as u64);
                append(&mut b, h, &name, None, &node.xattrs, &bytes[..]).map_err(at)?;
            }
            NodeKind::File { source, size, .. } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(*size);
                let as_io = |e| LayerError::Io {
                    path: source.clone(),
                    source: e,
                };
                let got = ahead.recv();
                if let (Some(c), Ok(Prefetched::Changed(_))) = (capturing.as_mut(), &got) {
                    c.changed = true;
                }
                let f = match got {
                    Ok(Prefetched::Bytes(bytes)) | Ok(Prefetched::Changed(bytes)) => {
                        if (bytes.len() as u64) < *size {
                            return Err(as_io(changed_size()));
                        }
                        append(&mut b, h, &name, None, &node.xattrs, &bytes[..]).map_err(as_io)?;
                        continue;
                    }
                    Ok(Prefetched::Opened(f)) => f,
                    Ok(Prefetched::Failed(e)) => return Err(as_io(e)),
                    Ok(Prefetched::Segment(_)) => {
                        return Err(layer_io(io::Error::other(
                            "the layer's reader lost its place in the tree",
                        )))
                    }
                    // The reader is gone (it cannot be, short of a panic): read here, and
                    // keep no segment of unchecked bytes.
                    Err(_) => {
                        if let Some(c) = capturing.as_mut() {
                            c.changed = true;
                        }
                        files.open_file(source).map_err(as_io)?
                    }
                };
                copier
                    .append(&mut b, h, &name, &node.xattrs, f, *size)
                    .map_err(as_io)?;
            }
        }
    }
    close(&mut b, &mut capturing, tree.nodes.len());
    let w = b.into_inner().map_err(layer_io)?;
    Ok((w.inner, reused))
}

/// Reads exactly `left` bytes or fails: a file that shrank while being copied is an error,
/// never a short entry.
fn changed_size() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file changed size while it was being copied",
    )
}

/// Copies source files into a tar, a [`COPY_BUFFER`] at a time, exactly their stat'ed size,
/// counting each in `reads`.
struct FileCopier<'a> {
    buf: Vec<u8>,
    reads: &'a Tally,
}

impl<'a> FileCopier<'a> {
    fn new(reads: &'a Tally) -> Self {
        FileCopier {
            buf: Vec::new(),
            reads,
        }
    }

    /// `f`'s entry, `size` bytes (a file that shrank is an error).
    fn append<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        h: tar::Header,
        name: &[u8],
        xattrs: &[(String, Vec<u8>)],
        f: fs::File,
        size: u64,
    ) -> io::Result<()> {
        let mut exact = ExactReader {
            inner: f.take(size),
            left: size,
        };
        if self.buf.is_empty() {
            self.buf = vec![0u8; COPY_BUFFER];
        }
        append_file(b, h, name, xattrs, &mut exact, &mut self.buf)?;
        self.reads.add(size);
        Ok(())
    }
}

struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: io::Read> io::Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 {
            return Err(changed_size());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Write the tar stream of `dir` into `w`, counting the files it reads in `reads`.
pub fn write_tar<W: Write>(
    dir: &Path,
    w: W,
    epoch: Option<i64>,
    reads: &Tally,
) -> Result<W, LayerError> {
    let mut b = tar::Builder::new(w);
    let mut copier = FileCopier::new(reads);
    b.mode(tar::HeaderMode::Complete);
    let mut seen_inodes: HashMap<(u64, u64), String> = HashMap::new();
    let walker = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    for entry in walker {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_path_buf();
            LayerError::Io {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("walk failed")),
            }
        })?;
        let path = entry.path();
        let rel = path
            .strip_prefix(dir)
            .map_err(|_| io_at(path)(io::Error::other("path outside layer root")))?;
        let rel_bytes = rel.as_os_str().as_bytes();
        let md = fs::symlink_metadata(path).map_err(io_at(path))?;
        let ft = md.file_type();
        let mtime = match epoch {
            Some(e) => md.mtime().min(e).max(0),
            None => md.mtime().max(0),
        };
        // Overlay whiteout: a 0/0 character device means "deleted in this layer".
        if (ft.is_char_device() && md.rdev() == 0) || is_user_whiteout(path, &md) {
            let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            let mut wh = rel
                .parent()
                .map(|p| p.as_os_str().as_bytes().to_vec())
                .unwrap_or_default();
            if !wh.is_empty() {
                wh.push(b'/');
            }
            wh.extend_from_slice(b".wh.");
            wh.extend_from_slice(name);
            let mut h = base_header(&md, mtime);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(0);
            append(&mut b, h, &wh, None, &[], io::empty()).map_err(io_at(path))?;
            continue;
        }
        let xattrs = read_xattrs(path);
        let mut h = base_header(&md, mtime);
        let mut name = rel_bytes.to_vec();
        let mut link: Option<Vec<u8>> = None;
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            name.push(b'/');
            append(&mut b, h, &name, None, &xattrs, io::empty()).map_err(io_at(path))?;
            if has_opaque(path) {
                let mut opq = rel_bytes.to_vec();
                opq.extend_from_slice(b"/.wh..wh..opq");
                let mut h = base_header(&md, mtime);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                append(&mut b, h, &opq, None, &[], io::empty()).map_err(io_at(path))?;
            }
            continue;
        }
        if ft.is_file() {
            if md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = seen_inodes.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    link = Some(first.as_bytes().to_vec());
                    append(&mut b, h, &name, link.as_deref(), &xattrs, io::empty())
                        .map_err(io_at(path))?;
                    continue;
                }
                seen_inodes.insert(key, String::from_utf8_lossy(rel_bytes).into_owned());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            let f = super::at::open_regular(path).map_err(io_at(path))?;
            copier
                .append(&mut b, h, &name, &xattrs, f, md.len())
                .map_err(io_at(path))?;
            continue;
        }
        if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            link = Some(
                fs::read_link(path)
                    .map_err(io_at(path))?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            );
        } else if ft.is_char_device() || ft.is_block_device() {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            let rdev = md.rdev();
            h.set_device_major(libc::major(rdev)).map_err(io_at(path))?;
            h.set_device_minor(libc::minor(rdev)).map_err(io_at(path))?;
        } else if ft.is_fifo() {
            h.set_entry_type(tar::EntryType::Fifo);
        } else {
            continue; // sockets are not part of images
        }
        append(&mut b, h, &name, link.as_deref(), &xattrs, io::empty()).map_err(io_at(path))?;
    }
    b.into_inner().map_err(io_at(dir))
}

/// The whiteout an unprivileged writer can make where a 0/0 device cannot be (a container's
/// device rules): an empty regular file marked with [`USER_WHITEOUT_XATTR`].
fn is_user_whiteout(path: &Path, md: &fs::Metadata) -> bool {
    md.file_type().is_file()
        && md.len() == 0
        && xattr::get(path, USER_WHITEOUT_XATTR)
            .ok()
            .flatten()
            .as_deref()
            == Some(b"y")
}

fn has_opaque(path: &Path) -> bool {
    [OPAQUE_XATTR, USER_OPAQUE_XATTR]
        .iter()
        .any(|x| xattr::get(path, x).ok().flatten().as_deref() == Some(b"y"))
}

/// Fixed header fields: mode, ids, mtime; no user or group names, no device numbers.
fn base_header(md: &fs::Metadata, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(md.uid() as u64);
    h.set_gid(md.gid() as u64);
    h.set_mtime(mtime as u64);
    h.set_size(0);
    h
}

/// The xattrs worth keeping (overlay's own are not part of the image).
pub fn read_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            let name = n.to_string_lossy().into_owned();
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(path, &n) {
                out.push((name, v));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, u8, u64)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type().as_byte(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn sorted_clamped_and_long_names() {
        let t = tempfile::tempdir().unwrap();
        let long = "x".repeat(150);
        fs::create_dir_all(t.path().join("b/c")).unwrap();
        fs::write(t.path().join("a"), b"1").unwrap();
        fs::write(t.path().join("b/c").join(&long), b"2").unwrap();
        fs::hard_link(t.path().join("a"), t.path().join("z")).unwrap();
        let out = write_tar(t.path(), Vec::new(), Some(1000), &Tally::default()).unwrap();
        let es = entries(&out);
        let names: Vec<&str> = es.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "a".to_string(),
                "b/".into(),
                "b/c/".into(),
                format!("b/c/{long}"),
                "z".into()
            ]
        );
        assert!(es.iter().all(|e| e.2 == 1000));
        assert_eq!(es[4].1, b'1', "second name of an inode is a hardlink");
    }

    #[test]
    fn tree_keys_order_and_compare_as_paths_do() {
        let names = [
            "a", "a/b", "a/b/c", "a.b", "a-b", "a/b.c", "a/bc", "ab", "b", "a/b/", "a//b", "a/./b",
            "é", "a/é", "A", "a/B", "z/y", "a0", "a/0", "\u{1}", "a\u{1}b",
        ];
        for x in names {
            for y in names {
                let (px, py) = (Path::new(x), Path::new(y));
                let (kx, ky) = (TreeKey::new(x), TreeKey::new(y));
                assert_eq!(kx.cmp(&ky), px.cmp(py), "{:?} vs {:?}", x, y);
                assert_eq!(kx == ky, px == py, "{:?} == {:?}", x, y);
            }
        }
        // A layer path has no leading `./` or `/`.
        assert_eq!(TreeKey::new("./a/"), TreeKey::new("a"));
        assert_eq!(TreeKey::new("/a//b"), TreeKey::new("a/b"));
    }

    #[test]
    fn zstd_frames_do_not_depend_on_the_number_of_workers() {
        let mut data = Vec::new();
        let mut x: u64 = 7;
        for i in 0..(24 << 20) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.push(if i % 3 == 0 { x as u8 } else { (i % 251) as u8 });
        }
        let frame = |workers: u32| {
            let mut z = zstd::Encoder::new(Vec::new(), 3).unwrap();
            z.multithread(workers).unwrap();
            z.write_all(&data).unwrap();
            z.finish().unwrap()
        };
        let one = frame(1);
        assert_eq!(one, frame(2));
        assert_eq!(one, frame(7));
    }

    /// Segments kept in memory; `damaged` makes every read fail as a damaged file would.
    #[derive(Default)]
    struct MemorySegments {
        kept: std::sync::Mutex<HashMap<super::super::segments::SegmentKey, Vec<u8>>>,
        damaged: bool,
    }

    impl super::super::segments::SegmentStore for MemorySegments {
        fn read_into(&self, key: &super::super::segments::SegmentKey, buf: &mut Vec<u8>) -> bool {
            buf.clear();
            match self.kept.lock().unwrap().get(key) {
                Some(b) if !self.damaged => {
                    buf.extend_from_slice(b);
                    true
                }
                _ => false,
            }
        }
        fn put(&self, key: &super::super::segments::SegmentKey, bytes: &[u8]) {
            self.kept.lock().unwrap().insert(*key, bytes.to_vec());
        }
    }

    /// 600 small files in 3 directories, a big one and a symlink, each file with the
    /// sha256 of its bytes (as a COPY from the context has them).
    fn small_files_tree(dir: &Path) -> LayerTree {
        use sha2::Digest as _;
        let mut tree = LayerTree::default();
        let node = |kind| TreeNode {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_000,
            xattrs: Vec::new(),
        };
        for d in 0..3 {
            tree.nodes
                .insert(TreeKey::new(format!("app/d{}", d)), node(NodeKind::Dir));
            for f in 0..200 {
                let source = dir.join(format!("d{}-f{}", d, f));
                let bytes = format!("file {} of directory {}\n", f, d).repeat(f + 1);
                fs::write(&source, &bytes).unwrap();
                tree.nodes.insert(
                    TreeKey::new(format!("app/d{}/f{:03}", d, f)),
                    node(NodeKind::File {
                        source,
                        size: bytes.len() as u64,
                        content: Some(sha2::Sha256::digest(bytes.as_bytes()).into()),
                    }),
                );
            }
        }
        let big = dir.join("big");
        fs::write(&big, vec![7u8; 200 << 10]).unwrap();
        tree.nodes.insert(
            TreeKey::new("app/d1/zz-big"),
            node(NodeKind::File {
                source: big,
                size: 200 << 10,
                content: None,
            }),
        );
        tree.nodes.insert(
            TreeKey::new("app/link"),
            node(NodeKind::Symlink(PathBuf::from("d0/f000"))),
        );
        tree.nodes.insert(TreeKey::new("app"), node(NodeKind::Dir));
        tree
    }

    fn tar_of(
        tree: &LayerTree,
        store: Option<&dyn super::super::segments::SegmentStore>,
    ) -> (Vec<u8>, Segmented) {
        let mut segmented = Segmented::default();
        let tar = write_tar_tree(tree, Vec::new(), Some(500), store, &mut segmented).unwrap();
        (tar, segmented)
    }

    #[test]
    fn a_tree_written_from_stored_segments_is_the_tree_written_from_its_files() {
        let src = tempfile::tempdir().unwrap();
        let mut tree = small_files_tree(src.path());
        let (plain, _) = tar_of(&tree, None);
        let store = MemorySegments::default();
        let (first, cut) = tar_of(&tree, Some(&store));
        assert_eq!(first, plain);
        assert!(cut.keys.len() > 5, "600 small files make several segments");
        assert_eq!(
            (cut.reused, store.kept.lock().unwrap().len()),
            (0, cut.keys.len())
        );
        let (again, rewritten) = tar_of(&tree, Some(&store));
        assert_eq!(again, plain, "every segment read back gives the same tar");
        assert_eq!(rewritten.reused, cut.keys.len());

        // One file edited: only its segment is written from files.
        use sha2::Digest as _;
        let key = TreeKey::new("app/d1/f100");
        let bytes = b"edited\n".to_vec();
        if let Some(TreeNode {
            kind:
                NodeKind::File {
                    source,
                    size,
                    content,
                },
            ..
        }) = tree.nodes.get_mut(&key)
        {
            fs::write(&*source, &bytes).unwrap();
            *size = bytes.len() as u64;
            *content = Some(sha2::Sha256::digest(&bytes).into());
        }
        let (plain, _) = tar_of(&tree, None);
        let (edited, after) = tar_of(&tree, Some(&store));
        assert_eq!(edited, plain);
        assert_eq!(
            after.keys.len(),
            cut.keys.len(),
            "an edit moves no boundary"
        );
        assert_eq!(after.reused, cut.keys.len() - 1);

        // Damaged segments are not used: the files are read instead.
        let damaged = MemorySegments {
            kept: std::sync::Mutex::new(store.kept.lock().unwrap().clone()),
            damaged: true,
        };
        let (read_again, none) = tar_of(&tree, Some(&damaged));
        assert_eq!(read_again, plain);
        assert_eq!(none.reused, 0);
    }

    #[test]
    fn a_segment_whose_file_changed_since_its_digest_is_written_but_not_kept() {
        let src = tempfile::tempdir().unwrap();
        let tree = small_files_tree(src.path());
        // The file changes after its digest was taken (same size, other bytes).
        let path = src.path().join("d2-f7");
        let changed = vec![b'x'; fs::metadata(&path).unwrap().len() as usize];
        fs::write(&path, &changed).unwrap();
        let store = MemorySegments::default();
        let (tar, cut) = tar_of(&tree, Some(&store));
        assert_eq!(tar, tar_of(&tree, None).0);
        assert!(
            tar.windows(changed.len()).any(|w| w == &changed[..]),
            "the layer holds the bytes that were read"
        );
        assert_eq!(
            store.kept.lock().unwrap().len(),
            cut.keys.len() - 1,
            "every segment but the changed file's is kept"
        );
    }

    #[test]
    fn big_files_of_a_tree_are_copied_whole_and_padded() {
        let src = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::default();
        let sizes = [70_001usize, (1 << 20) + 513, 3 << 20];
        for (i, size) in sizes.iter().enumerate() {
            let source = src.path().join(format!("big{}", i));
            let bytes: Vec<u8> = (0..*size).map(|k| (k * 7 + i) as u8).collect();
            fs::write(&source, &bytes).unwrap();
            tree.nodes.insert(
                TreeKey::new(format!("big{}", i)),
                TreeNode {
                    kind: NodeKind::File {
                        source,
                        size: *size as u64,
                        content: None,
                    },
                    mode: 0o600,
                    uid: 1,
                    gid: 2,
                    mtime: 3,
                    xattrs: Vec::new(),
                },
            );
        }
        let (tar_bytes, _) = tar_of(&tree, None);
        assert_eq!(tar_bytes.len() % 512, 0);
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            let i: usize = name.trim_start_matches("big").parse().unwrap();
            let want: Vec<u8> = (0..sizes[i]).map(|k| (k * 7 + i) as u8).collect();
            assert!(bytes == want, "{} holds other bytes", name);
            seen.push(name);
        }
        assert_eq!(seen, ["big0", "big1", "big2"]);
    }

    #[test]
    fn same_tree_same_digest() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("f"), b"data").unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(store_dir.path(), &store_dir.path().join("tmp")).unwrap();
        let o = LayerOptions {
            compression: Compression::Gzip(6),
            epoch: Some(0),
            reuse: None,
            segments: None,
        };
        let l1 = write_layer(&s, t.path(), o).unwrap();
        let l2 = write_layer(&s, t.path(), o).unwrap();
        assert_eq!(l1, l2);
        let mut gz = flate2::read::GzDecoder::new(fs::File::open(s.path(&l1.digest)).unwrap());
        let mut raw = Vec::new();
        gz.read_to_end(&mut raw).unwrap();
        assert_eq!(Digest::of(&raw), l1.diff_id);
    }
}
