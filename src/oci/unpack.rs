//! Unpacking layers from strangers. All unsafe-path decisions live in this file:
//! - entry names are cleaned; absolute names and names with `..` that climb out are refused;
//! - parent directories are resolved inside the target like a chroot would (a symlink parent
//!   is followed, but `..` and absolute targets are clamped at the target root), so no entry
//!   is ever written outside it;
//! - hardlinks must point at a regular file already inside the target;
//! - device nodes are skipped (reported) unless the caller allows them;
//! - whiteouts (`.wh.name`, `.wh..wh..opq`) delete what lower layers put there.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;

use super::digest::{Digest, HashingReader};

/// A refused or failed entry, naming the layer and the entry.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Unsafe {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {source}")]
    Io { layer: String, source: io::Error },
    /// The layer's content is not what the image's config says (a poisoned or damaged image).
    #[error("layer {layer}: its content has diff_id {found}, but the image config says {expected}: the image is damaged or forged, and nothing of it was kept")]
    DiffIdMismatch {
        layer: String,
        expected: Digest,
        found: Digest,
    },
    #[error("layer {layer}: no space left on the file system of {target} while unpacking")]
    NoSpace { layer: String, target: PathBuf },
}

/// What unpacking may do beyond plain files.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackOptions {
    /// Create device nodes (needs root); otherwise they are skipped.
    pub devices: bool,
    /// Apply uid/gid from the entries (needs root).
    pub ownership: bool,
    /// Unpack into an empty directory in overlayfs format: whiteouts become 0/0 character
    /// devices and opaque markers the `trusted.overlay.opaque` xattr, instead of deleting.
    pub overlay_format: bool,
    /// Create regular files empty (but small ones, and those under `etc/`: a COPY --chown or
    /// a WORKDIR reads users and groups): a tree with every name, type, mode, owner, time
    /// and link of the layer, for steps that look up paths but read no big file. The layer
    /// is still verified whole.
    pub metadata_only: bool,
    /// Overlay-format markers in `user.overlay.*`, as overlayfs' `userxattr` mode (a rootless
    /// mount) reads them; else in `trusted.overlay.*`.
    pub user_xattrs: bool,
    /// Of the entries' xattrs, apply `security.capability` alone (an ADDed archive: today's
    /// BuildKit carries no other into the layer).
    pub capability_xattr_only: bool,
}

/// Files up to this size keep their content in a [`UnpackOptions::metadata_only`] unpack.
const KEPT_IN_SKELETON: u64 = 64 << 10;

/// Statistics of one unpack, for the messages a caller prints.
#[derive(Debug, Default)]
pub struct UnpackReport {
    pub entries: usize,
    pub skipped_devices: Vec<String>,
}

/// Open a (possibly compressed) layer file: gzip, zstd, bzip2, xz or plain tar by magic bytes.
pub fn open_layer(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut f = fs::File::open(path)?;
    let mut magic = [0u8; 6];
    let n = read_fill(&mut f, &mut magic)?;
    let f = fs::File::open(path)?;
    decompress(&magic[..n], Box::new(f))
}

/// Read until `buf` is full or the stream ends; returns how much was read.
pub fn read_fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Wrap `r` in the decompressor its first bytes call for.
pub fn decompress(magic: &[u8], r: Box<dyn Read>) -> io::Result<Box<dyn Read>> {
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(r)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(zstd::Decoder::new(r)?),
        [b'B', b'Z', b'h', ..] => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => {
            Box::new(xz2::read::XzDecoder::new_multi_decoder(r))
        }
        _ => r,
    })
}

/// Whether the file starts like a compressed stream or a tar archive.
pub fn is_archive(path: &Path) -> bool {
    // As docker decides: whatever decompresses (or not) into something whose first block is
    // a valid tar header. A gzip of plain text is a file to copy, not an archive.
    let Ok(mut r) = open_layer(path) else {
        return false;
    };
    let mut head = [0u8; 512];
    match read_fill(&mut *r, &mut head) {
        Ok(512) => is_tar_header(&head),
        _ => false,
    }
}

/// Whether a 512-byte block is a tar header: its checksum field matches its bytes.
fn is_tar_header(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                b' ' as u32
            } else {
                *b as u32
            }
        })
        .sum();
    sum == stored
}

/// Clean an entry name into safe relative components, or say why it is refused.
pub(super) fn clean_entry(name: &[u8]) -> Result<PathBuf, String> {
    let p = Path::new(OsStr::from_bytes(name));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err("path climbs out of the layer root with '..'".into());
                }
            }
            // An absolute name is relative to the target, as docker's and containerd's
            // unpackers take it.
            Component::RootDir => {}
            Component::Prefix(_) => return Err("absolute path in a layer".into()),
        }
    }
    Ok(out)
}

/// Resolve `rel` inside `root` as if `root` were `/`: symlinks are followed but never leave it
/// (the one resolver, [`super::root::Root::resolve`]).
pub fn resolve_in_root(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    match super::root::Root::open(root) {
        Ok(r) => r.resolve(rel),
        // Nothing there yet, so no link to follow: the path as written, kept inside.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut out = PathBuf::new();
            for c in rel.components() {
                match c {
                    Component::Normal(n) => out.push(n),
                    Component::ParentDir => {
                        out.pop();
                    }
                    _ => {}
                }
            }
            Ok(root.join(out))
        }
        Err(e) => Err(e),
    }
}

/// Remove a path whatever it is (file, symlink or tree); absent is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unpack the archive or layer at `layer_path` (any supported compression) into `target`.
pub fn unpack_layer(
    layer_path: &Path,
    layer_name: &str,
    target: &Path,
    opts: UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    // Pass 1: whiteouts, applied before anything of this layer is written.
    if !opts.overlay_format {
        apply_whiteouts(layer_path, layer_name, target)?;
    }
    unpack_entries(layer_path, layer_name, target, opts)
}

/// Unpack an image layer and check that its uncompressed stream hashes to `diff_id`, the
/// value the image's config claims. On a mismatch `target` holds unverified content: the
/// caller must discard it (the snapshotter never publishes it).
pub fn unpack_verified(
    layer_path: &Path,
    layer_name: &str,
    target: &Path,
    opts: UnpackOptions,
    diff_id: &Digest,
) -> Result<UnpackReport, UnpackError> {
    unpack_verified_teeing(
        layer_path,
        layer_name,
        target,
        opts,
        diff_id,
        &mut io::sink(),
    )
}

/// [`unpack_verified`], with `tee` shown the whole uncompressed tar as it is read (to scan
/// it without decompressing the blob a second time).
pub fn unpack_verified_teeing(
    layer_path: &Path,
    layer_name: &str,
    target: &Path,
    opts: UnpackOptions,
    diff_id: &Digest,
    tee: &mut dyn io::Write,
) -> Result<UnpackReport, UnpackError> {
    if !opts.overlay_format {
        apply_whiteouts(layer_path, layer_name, target)?;
    }
    let io_e = unpack_io_error(layer_name, target);
    let stream = open_layer(layer_path).map_err(&io_e)?;
    let mut hashed = HashingReader::new(TeeReader { inner: stream, tee });
    let (report, dir_times) = unpack_tar(&mut hashed, layer_name, target, opts)?;
    // The whole uncompressed stream, end-of-archive blocks included, is what diff_id names.
    let (found, _) = hashed.finish().map_err(&io_e)?;
    if &found != diff_id {
        return Err(UnpackError::DiffIdMismatch {
            layer: layer_name.to_string(),
            expected: diff_id.clone(),
            found,
        });
    }
    set_dir_times(dir_times);
    Ok(report)
}

/// A reader that also writes what it reads to `tee`.
struct TeeReader<'t, R> {
    inner: R,
    tee: &'t mut dyn io::Write,
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tee.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Write a regular file's content, leaving holes where it is all zeros (GNU sparse entries
/// arrive expanded; a hole costs no disk).
fn write_sparse(from: &mut dyn Read, to: &mut fs::File) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut buf = vec![0u8; 64 * 1024];
    let mut len: u64 = 0;
    let mut pending_hole = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n as u64;
        if buf[..n].iter().all(|b| *b == 0) {
            to.seek(SeekFrom::Current(n as i64))?;
            pending_hole = true;
        } else {
            to.write_all(&buf[..n])?;
            pending_hole = false;
        }
    }
    if pending_hole {
        to.set_len(len)?;
    }
    Ok(())
}

/// Delete what the layer's whiteouts name from `target`.
fn apply_whiteouts(layer_path: &Path, layer_name: &str, target: &Path) -> Result<(), UnpackError> {
    let io_e = |source| UnpackError::Io {
        layer: layer_name.to_string(),
        source,
    };
    let mut archive = tar::Archive::new(open_layer(layer_path).map_err(&io_e)?);
    let mut opaque = Vec::new();
    let mut whiteouts = Vec::new();
    for e in archive.entries().map_err(&io_e)? {
        let e = e.map_err(&io_e)?;
        let name = e.path_bytes().into_owned();
        let unsafe_e = |reason: String| UnpackError::Unsafe {
            layer: layer_name.to_string(),
            entry: String::from_utf8_lossy(&name).into_owned(),
            reason,
        };
        let rel = clean_entry(&name).map_err(unsafe_e)?;
        let Some(base) = rel.file_name().map(|b| b.as_bytes().to_vec()) else {
            continue;
        };
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if base == b".wh..wh..opq" {
            opaque.push(parent);
        } else if let Some(hidden) = base.strip_prefix(b".wh.") {
            whiteouts.push(parent.join(OsStr::from_bytes(hidden)));
        }
    }
    for dir in opaque {
        let d = resolve_in_root(target, &dir).map_err(&io_e)?;
        if let Ok(rd) = fs::read_dir(&d) {
            for child in rd.flatten() {
                remove_any(&child.path()).map_err(&io_e)?;
            }
        }
    }
    for w in whiteouts {
        let parent = resolve_in_root(target, w.parent().unwrap_or(Path::new(""))).map_err(&io_e)?;
        if let Some(name) = w.file_name() {
            remove_any(&parent.join(name)).map_err(&io_e)?;
        }
    }

    Ok(())
}

/// An I/O error while unpacking `layer_name` into `target` (running out of space says so).
fn unpack_io_error(layer_name: &str, target: &Path) -> impl Fn(io::Error) -> UnpackError {
    let (layer, target) = (layer_name.to_string(), target.to_path_buf());
    move |source: io::Error| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            UnpackError::NoSpace {
                layer: layer.clone(),
                target: target.clone(),
            }
        } else {
            UnpackError::Io {
                layer: layer.clone(),
                source,
            }
        }
    }
}

/// Write the layer's entries (not its whiteouts, unless in overlay format) into `target`.
fn unpack_entries(
    layer_path: &Path,
    layer_name: &str,
    target: &Path,
    opts: UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    let io_e = unpack_io_error(layer_name, target);
    let stream = open_layer(layer_path).map_err(&io_e)?;
    let (report, dir_times) = unpack_tar(stream, layer_name, target, opts)?;
    set_dir_times(dir_times);
    Ok(report)
}

/// Unpack, in overlay format into an empty `target`, a tar this process writes itself and
/// whose diff_id it computes as it writes (so it is not hashed again here): a layer's
/// snapshot made from the layer's own stream, as the layer is written.
pub fn unpack_own_tar(
    tar: impl Read,
    layer_name: &str,
    target: &Path,
    opts: UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    if !opts.overlay_format {
        return Err(unpack_io_error(layer_name, target)(io::Error::other(
            "a layer's own stream is unpacked in overlay format only",
        )));
    }
    let (report, dir_times) = unpack_tar(tar, layer_name, target, opts)?;
    set_dir_times(dir_times);
    Ok(report)
}

/// A writer that unpacks what it is given ([`unpack_own_tar`]) on a thread of its own: the
/// tee of a layer being written, so that its snapshot needs no second read of the blob.
/// Writing never fails: if the unpack stops, the rest is dropped and [`finish`] says why.
///
/// [`finish`]: StreamUnpacker::finish
pub struct StreamUnpacker {
    chunks: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    worker: Option<std::thread::JoinHandle<Result<UnpackReport, UnpackError>>>,
    layer_name: String,
    target: PathBuf,
}

/// Bytes handed to the unpacking thread at a time, and how many such chunks may wait.
const UNPACK_CHUNK: usize = 1 << 20;
const UNPACK_QUEUE: usize = 4;

impl StreamUnpacker {
    pub fn start(
        layer_name: &str,
        target: &Path,
        opts: UnpackOptions,
    ) -> Result<StreamUnpacker, UnpackError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(UNPACK_QUEUE);
        let (name, dir) = (layer_name.to_string(), target.to_path_buf());
        let worker = std::thread::Builder::new()
            .name("unpack".into())
            .spawn(move || {
                let reader = ChunkReader {
                    chunks: rx,
                    current: Vec::new(),
                    at: 0,
                };
                unpack_own_tar(reader, &name, &dir, opts)
            })
            .map_err(unpack_io_error(layer_name, target))?;
        Ok(StreamUnpacker {
            chunks: Some(tx),
            buf: Vec::with_capacity(UNPACK_CHUNK),
            worker: Some(worker),
            layer_name: layer_name.to_string(),
            target: target.to_path_buf(),
        })
    }

    fn send(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(UNPACK_CHUNK));
        if let Some(tx) = &self.chunks {
            if tx.send(chunk).is_err() {
                // The unpack has stopped; its result says why.
                self.chunks = None;
            }
        }
    }

    /// Hand over the rest, wait for the unpack and return its outcome.
    pub fn finish(mut self) -> Result<UnpackReport, UnpackError> {
        self.send();
        self.chunks = None;
        let failed = unpack_io_error(&self.layer_name, &self.target);
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(result)) => result,
            _ => Err(failed(io::Error::other("the unpacking thread stopped"))),
        }
    }
}

impl io::Write for StreamUnpacker {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.chunks.is_some() {
            self.buf.extend_from_slice(data);
            if self.buf.len() >= UNPACK_CHUNK {
                self.send();
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamUnpacker {
    fn drop(&mut self) {
        // An abandoned unpack ends at the stream's end; wait so its target can be removed.
        self.chunks = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The reading end of a [`StreamUnpacker`].
struct ChunkReader {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.recv() {
                Ok(next) => {
                    self.current = next;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Directories' mtimes, set last (deepest first), once nothing more is written in them.
fn set_dir_times(dir_times: Vec<(PathBuf, i64)>) {
    for (d, t) in dir_times.into_iter().rev() {
        set_mtime(&d, t);
    }
}

/// The entries of one uncompressed tar stream, written into `target`; returns the
/// directories whose mtimes are still to be set.
#[allow(clippy::type_complexity)]
fn unpack_tar(
    stream: impl Read,
    layer_name: &str,
    target: &Path,
    opts: UnpackOptions,
) -> Result<(UnpackReport, Vec<(PathBuf, i64)>), UnpackError> {
    let io_e = unpack_io_error(layer_name, target);
    let mut report = UnpackReport::default();
    let mut archive = tar::Archive::new(stream);
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    // The directory the last regular file went into, held open: a layer lists a
    // directory's files together, and each of them is then one `openat` in it, not a walk
    // from the root. Kept only across regular files that replaced nothing (nothing else
    // can change how its path resolves).
    let mut last_dir: Option<HeldDir> = None;
    for e in archive.entries().map_err(&io_e)? {
        let mut e = e.map_err(&io_e)?;
        // Metadata entries the tar reader leaves in the stream (a pax global header, as GNU
        // tar and `git archive` write): never files, whatever name they carry.
        if matches!(
            e.header().entry_type(),
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let name = e.path_bytes().into_owned();
        let entry_name = String::from_utf8_lossy(&name).into_owned();
        let unsafe_e = |reason: String| UnpackError::Unsafe {
            layer: layer_name.to_string(),
            entry: entry_name.clone(),
            reason,
        };
        let rel = clean_entry(&name).map_err(unsafe_e)?;
        let Some(base) = rel.file_name() else {
            continue;
        };
        if let Some(hidden) = base.as_bytes().strip_prefix(b".wh.") {
            // A whiteout may remove a directory on the held one's path.
            last_dir = None;
            if opts.overlay_format {
                let parent = resolve_in_root(target, rel.parent().unwrap_or(Path::new("")))
                    .map_err(&io_e)?;
                fs::create_dir_all(&parent).map_err(&io_e)?;
                if hidden == b".wh..opq" {
                    let marker = if opts.user_xattrs {
                        "user.overlay.opaque"
                    } else {
                        "trusted.overlay.opaque"
                    };
                    xattr::set(&parent, marker, b"y").map_err(&io_e)?;
                } else {
                    let p = parent.join(OsStr::from_bytes(hidden));
                    let _ = remove_any(&p);
                    nix::sys::stat::mknod(
                        &p,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::empty(),
                        0,
                    )
                    .map_err(|e| io_e(io::Error::from(e)))?;
                }
            }
            continue;
        }
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let held = match last_dir.take().filter(|d| d.rel == parent_rel) {
            Some(d) => d,
            None => {
                let path = resolve_in_root(target, parent_rel).map_err(&io_e)?;
                fs::create_dir_all(&path).map_err(&io_e)?;
                let fd = super::at::open_dir(&path, OFlag::O_RDONLY).map_err(&io_e)?;
                HeldDir {
                    rel: parent_rel.to_path_buf(),
                    path,
                    fd,
                }
            }
        };
        let dest = held.path.join(base);
        let h = e.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        // A PAX mtime (possibly fractional, "1485449953.5") wins over the header's field.
        let pax_mtime = e.pax_extensions().ok().flatten().and_then(|exts| {
            exts.flatten()
                .find(|x| x.key() == Ok("mtime"))
                .and_then(|x| x.value().ok().map(str::to_string))
        });
        let mtime = pax_mtime
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .map(|v| v.floor() as i64)
            .unwrap_or_else(|| h.mtime().unwrap_or(0) as i64);
        let kind = h.entry_type();
        if kind == tar::EntryType::Regular {
            let uid_gid = opts
                .ownership
                .then(|| (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32));
            // Skipped content is still read (and hashed) as the next entry is reached.
            let content =
                !opts.metadata_only || rel.starts_with("etc") || e.size() <= KEPT_IN_SKELETON;
            let file = NewFile {
                mode,
                mtime,
                owner: uid_gid,
                content,
            };
            let replaced = write_regular(&held, base, &dest, &mut e, file).map_err(&io_e)?;
            // After the owner: a chown clears `security.capability`.
            set_pax_xattrs(&mut e, &dest, &opts);
            report.entries += 1;
            if !replaced {
                last_dir = Some(held);
            }
            continue;
        }
        if !kind.is_dir() {
            if let Ok(md) = fs::symlink_metadata(&dest) {
                if md.is_dir() && !kind.is_dir() {
                    fs::remove_dir_all(&dest).map_err(&io_e)?;
                } else if !md.is_dir() {
                    fs::remove_file(&dest).map_err(&io_e)?;
                }
            }
        }
        match kind {
            tar::EntryType::Directory => {
                if let Ok(md) = fs::symlink_metadata(&dest) {
                    if !md.is_dir() {
                        fs::remove_file(&dest).map_err(&io_e)?;
                    }
                }
                fs::create_dir_all(&dest).map_err(&io_e)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(&io_e)?;
                dir_times.push((dest.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut f = fs::File::create(&dest).map_err(&io_e)?;
                // Skipped content is still read (and hashed) as the next entry is reached.
                if !opts.metadata_only || rel.starts_with("etc") || e.size() <= KEPT_IN_SKELETON {
                    write_sparse(&mut e, &mut f).map_err(&io_e)?;
                }
                drop(f);
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(&io_e)?;
            }
            tar::EntryType::Symlink => {
                let link = e
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                // The link itself is harmless as stored; following it is what resolve_in_root guards.
                symlink(OsStr::from_bytes(&link), &dest).map_err(&io_e)?;
            }
            tar::EntryType::Link => {
                let link = e
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                let link_rel =
                    clean_entry(&link).map_err(|r| unsafe_e(format!("hardlink target: {}", r)))?;
                let src_parent =
                    resolve_in_root(target, link_rel.parent().unwrap_or(Path::new("")))
                        .map_err(&io_e)?;
                let src = src_parent.join(link_rel.file_name().unwrap_or_default());
                match fs::symlink_metadata(&src) {
                    Ok(md) if md.is_file() && src.starts_with(target) => {
                        fs::hard_link(&src, &dest).map_err(&io_e)?;
                        // As Docker's and containerd's appliers: the link entry's mode is
                        // applied to the inode both names share.
                        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                            .map_err(&io_e)?;
                    }
                    _ => {
                        return Err(unsafe_e(format!(
                            "hardlink to {:?}, which is not a file inside the image",
                            String::from_utf8_lossy(&link)
                        )))
                    }
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if kind != tar::EntryType::Fifo && !opts.devices {
                    report.skipped_devices.push(entry_name.clone());
                    continue;
                }
                let sflag = match kind {
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    tar::EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                    _ => nix::sys::stat::SFlag::S_IFIFO,
                };
                let dev = libc::makedev(
                    h.device_major().ok().flatten().unwrap_or(0),
                    h.device_minor().ok().flatten().unwrap_or(0),
                );
                nix::sys::stat::mknod(
                    &dest,
                    sflag,
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    dev,
                )
                .map_err(|e| io_e(io::Error::from(e)))?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            _ => continue,
        }
        if opts.ownership {
            let uid = h.uid().unwrap_or(0) as u32;
            let gid = h.gid().unwrap_or(0) as u32;
            let _ = nix::unistd::fchownat(
                None,
                &dest,
                Some(uid.into()),
                Some(gid.into()),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            if kind == tar::EntryType::Regular && mode & 0o7000 != 0 {
                let _ = fs::set_permissions(&dest, fs::Permissions::from_mode(mode));
            }
        }
        // After the owner: a chown clears `security.capability`, as it clears set-uid bits.
        set_pax_xattrs(&mut e, &dest, &opts);
        if !kind.is_dir() {
            set_mtime(&dest, mtime);
        }
        report.entries += 1;
    }
    Ok((report, dir_times))
}

/// Set the xattrs of `e`'s PAX records on `dest` (only `security.capability` when `opts`
/// say so); best effort.
fn set_pax_xattrs<R: Read>(e: &mut tar::Entry<R>, dest: &Path, opts: &UnpackOptions) {
    if let Ok(Some(exts)) = e
        .pax_extensions()
        .map(|x| x.map(|x| x.flatten().collect::<Vec<_>>()))
    {
        for ext in exts {
            if let Some(name) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                if opts.capability_xattr_only && name != "security.capability" {
                    continue;
                }
                let _ = xattr::set(dest, name, ext.value_bytes());
            }
        }
    }
}

/// A directory of the target, by its name in the layer and its path, held open.
struct HeldDir {
    rel: PathBuf,
    path: PathBuf,
    fd: std::os::fd::OwnedFd,
}

/// What a regular file's entry sets: its mode, mtime, owner (`None`: left as created), and
/// whether its content is written.
struct NewFile {
    mode: u32,
    mtime: i64,
    owner: Option<(u32, u32)>,
    content: bool,
}

/// A regular file's entry, written as `name` in `dir` (`dest` is its path) through one
/// descriptor: created new (never through a link), filled, owned, moded and dated. Whatever
/// was at `dest` is replaced; returns whether something was.
fn write_regular(
    dir: &HeldDir,
    name: &OsStr,
    dest: &Path,
    e: &mut dyn Read,
    file: NewFile,
) -> io::Result<bool> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let create = || {
        nix::fcntl::openat(
            Some(dir.fd.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
    };
    let (fd, replaced) = match create() {
        Ok(fd) => (fd, false),
        Err(nix::errno::Errno::EEXIST) => {
            remove_any(dest)?;
            (create().map_err(io::Error::from)?, true)
        }
        Err(e) => return Err(e.into()),
    };
    // SAFETY: `openat` just returned this descriptor, and nothing else owns it.
    let mut f = unsafe { fs::File::from_raw_fd(fd) };
    if file.content {
        write_sparse(e, &mut f)?;
    }
    if let Some((uid, gid)) = file.owner {
        let _ = nix::unistd::fchown(f.as_raw_fd(), Some(uid.into()), Some(gid.into()));
    }
    // After the owner: a chown clears set-uid bits.
    f.set_permissions(fs::Permissions::from_mode(file.mode))?;
    let ts = nix::sys::time::TimeSpec::new(file.mtime, 0);
    let _ = nix::sys::stat::futimens(f.as_raw_fd(), &ts, &ts);
    Ok(replaced)
}

/// Set a path's mtime (and atime) without following symlinks; best effort.
pub fn set_mtime(p: &Path, secs: i64) {
    let ts = nix::sys::time::TimeSpec::new(secs, 0);
    let _ = nix::sys::stat::utimensat(
        None,
        p,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            {
                let raw = h.as_old_mut();
                raw.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            if let Some(l) = link {
                h.set_link_name_literal(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn pax_global_headers_are_skipped_and_fractional_mtimes_kept() {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        let record = |k: &str, v: &str| {
            let body = format!(" {}={}\n", k, v);
            let mut n = body.len() + 1;
            while format!("{}{}", n, body).len() != n {
                n += 1;
            }
            format!("{}{}", n, body)
        };
        let global = record("comment", "written by git archive");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XGlobalHeader);
        h.set_path("pax_global_header").unwrap();
        h.set_size(global.len() as u64);
        h.set_cksum();
        b.append(&h, global.as_bytes()).unwrap();
        let local = record("mtime", "1485449953.5");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("PaxHeaders/f").unwrap();
        h.set_size(local.len() as u64);
        h.set_cksum();
        b.append(&h, local.as_bytes()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("f").unwrap();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(1);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        b.finish().unwrap();
        let target = tempfile::tempdir().unwrap();
        unpack_layer(f.path(), "test", target.path(), UnpackOptions::default()).unwrap();
        assert!(!target.path().join("pax_global_header").exists());
        let md = fs::symlink_metadata(target.path().join("f")).unwrap();
        assert_eq!(md.mtime(), 1485449953);
    }

    #[test]
    fn a_gzip_of_text_is_not_an_archive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.gz");
        let mut gz = flate2::write::GzEncoder::new(
            fs::File::create(&p).unwrap(),
            flate2::Compression::default(),
        );
        std::io::Write::write_all(&mut gz, &[b'x'; 600]).unwrap();
        gz.finish().unwrap();
        assert!(!is_archive(&p));
        let t = layer(&[("a", tar::EntryType::Regular, b"a", None)]);
        assert!(is_archive(t.path()));
    }

    #[test]
    fn refuses_dotdot_and_keeps_absolute_names_inside() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("t");
        fs::create_dir(&target).unwrap();
        for name in ["../evil", "a/../../evil"] {
            let l = layer(&[(name, tar::EntryType::Regular, b"x", None)]);
            let e = unpack_layer(l.path(), "test", &target, UnpackOptions::default()).unwrap_err();
            assert!(matches!(e, UnpackError::Unsafe { .. }), "{name}: {e}");
        }
        assert!(!root.path().join("evil").exists());
        // As docker's and containerd's unpackers: an absolute name is relative to the target.
        let l = layer(&[("/etc/evil", tar::EntryType::Regular, b"x", None)]);
        unpack_layer(l.path(), "test", &target, UnpackOptions::default()).unwrap();
        assert!(target.join("etc/evil").is_file());
        assert!(!Path::new("/etc/evil").exists());
    }

    #[test]
    fn symlink_parent_is_clamped_inside_target() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("t");
        fs::create_dir(&target).unwrap();
        let l = layer(&[
            ("escape", tar::EntryType::Symlink, b"", Some("../../..")),
            ("escape/pwned", tar::EntryType::Regular, b"x", None),
        ]);
        unpack_layer(l.path(), "test", &target, UnpackOptions::default()).unwrap();
        assert!(!root.path().join("pwned").exists());
        assert!(
            target.join("pwned").exists(),
            "written at the clamped location inside the target"
        );
    }

    #[test]
    fn hardlink_outside_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("t");
        fs::create_dir(&target).unwrap();
        let l = layer(&[("h", tar::EntryType::Link, b"", Some("../../etc/passwd"))]);
        assert!(unpack_layer(l.path(), "test", &target, UnpackOptions::default()).is_err());
        let l = layer(&[
            ("s", tar::EntryType::Symlink, b"", Some("/etc/passwd")),
            ("h", tar::EntryType::Link, b"", Some("s")),
        ]);
        let e = unpack_layer(l.path(), "test", &target, UnpackOptions::default());
        assert!(
            e.is_err(),
            "a hardlink through a symlink to the host is refused"
        );
    }

    #[test]
    fn whiteouts_delete_lower_content() {
        let target = tempfile::tempdir().unwrap();
        fs::create_dir_all(target.path().join("d/sub")).unwrap();
        fs::write(target.path().join("d/old"), b"1").unwrap();
        fs::write(target.path().join("gone"), b"1").unwrap();
        let l = layer(&[
            ("d/", tar::EntryType::Directory, b"", None),
            ("d/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            ("d/new", tar::EntryType::Regular, b"n", None),
            (".wh.gone", tar::EntryType::Regular, b"", None),
        ]);
        unpack_layer(l.path(), "test", target.path(), UnpackOptions::default()).unwrap();
        assert!(target.path().join("d/new").exists());
        assert!(!target.path().join("d/old").exists());
        assert!(!target.path().join("d/sub").exists());
        assert!(!target.path().join("gone").exists());
    }

    /// Everything an unpack decides about each path under `dir`, one line per path.
    fn tree_state(dir: &Path) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        walkdir::WalkDir::new(dir)
            .sort_by_file_name()
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                let md = e.path().symlink_metadata().unwrap();
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                let content = if md.is_file() {
                    format!("{:x?}", fs::read(e.path()).unwrap())
                } else if md.file_type().is_symlink() {
                    fs::read_link(e.path()).unwrap().display().to_string()
                } else {
                    String::new()
                };
                let opaque = xattr::get(e.path(), "trusted.overlay.opaque")
                    .ok()
                    .flatten();
                format!(
                    "{} {:o} {} {}:{} {} {} {:?} {}",
                    rel,
                    md.mode(),
                    md.size(),
                    md.uid(),
                    md.gid(),
                    md.mtime(),
                    md.nlink(),
                    opaque,
                    content
                )
            })
            .collect()
    }

    #[test]
    fn a_layer_unpacked_from_its_own_stream_matches_one_unpacked_from_its_blob() {
        let big = vec![7u8; 200 << 10];
        let l = layer(&[
            ("d/", tar::EntryType::Directory, b"", None),
            ("d/small", tar::EntryType::Regular, b"small", None),
            ("d/big", tar::EntryType::Regular, &big, None),
            ("d/twin", tar::EntryType::Link, b"", Some("d/small")),
            ("d/to-big", tar::EntryType::Symlink, b"", Some("big")),
            ("etc/", tar::EntryType::Directory, b"", None),
            ("etc/passwd", tar::EntryType::Regular, &big, None),
            ("o/", tar::EntryType::Directory, b"", None),
            ("o/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            (".wh.gone", tar::EntryType::Regular, b"", None),
        ]);
        let bytes = fs::read(l.path()).unwrap();
        let diff_id = Digest::of(&bytes);
        for metadata_only in [false, true] {
            let opts = UnpackOptions {
                devices: false,
                ownership: true,
                overlay_format: true,
                metadata_only,
                user_xattrs: false,
                capability_xattr_only: false,
            };
            let from_blob = tempfile::tempdir().unwrap();
            unpack_verified(l.path(), "blob", from_blob.path(), opts, &diff_id).unwrap();
            let from_stream = tempfile::tempdir().unwrap();
            let mut u = StreamUnpacker::start("stream", from_stream.path(), opts).unwrap();
            // Pieces of odd sizes, some larger than a chunk handed to the thread.
            let mut rest = &bytes[..];
            for size in [1usize, 511, 4097, UNPACK_CHUNK + 3].iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*size).min(rest.len());
                io::Write::write_all(&mut u, &rest[..n]).unwrap();
                rest = &rest[n..];
            }
            u.finish().unwrap();
            assert_eq!(tree_state(from_stream.path()), tree_state(from_blob.path()));
            let big_size = fs::metadata(from_stream.path().join("d/big"))
                .unwrap()
                .len();
            assert_eq!(big_size, if metadata_only { 0 } else { big.len() as u64 });
        }
    }

    #[test]
    fn a_stream_unpack_that_fails_says_so_and_never_blocks_the_writer() {
        let l = layer(&[("../escape", tar::EntryType::Regular, b"x", None)]);
        let mut bytes = fs::read(l.path()).unwrap();
        bytes.extend(std::iter::repeat_n(0u8, 8 * UNPACK_CHUNK));
        let target = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            overlay_format: true,
            ..Default::default()
        };
        let mut u = StreamUnpacker::start("bad", target.path(), opts).unwrap();
        for piece in bytes.chunks(UNPACK_CHUNK / 2) {
            io::Write::write_all(&mut u, piece).unwrap();
        }
        assert!(matches!(u.finish(), Err(UnpackError::Unsafe { .. })));
        assert!(!target.path().join("escape").exists());
    }
}
