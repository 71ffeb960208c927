//! A content-addressed blob directory (`blobs/sha256/<hex>`, the OCI layout shape). Writes go
//! to a temporary file in the same filesystem, are synced, then renamed into place, so a blob
//! is either absent or complete. Reads verify the content against its name.
//!
//! A blob can also be known without being here: a layer a registry holds, which a build
//! that hits its cache never reads. [`BlobStore::ensure`] brings such a blob in (through the
//! store's [`BlobSource`]) the first time its bytes are needed.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::digest::{Digest, HashingWriter};

/// Errors of the blob store; each names the blob or path.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blob {0} is not in the store")]
    Missing(Digest),
    #[error("blob {digest} could not be fetched: {msg}")]
    Fetch { digest: Digest, msg: String },
    #[error("blob {expected} is corrupted: its content hashes to {found} ({path})")]
    Corrupted {
        expected: Digest,
        found: Digest,
        path: PathBuf,
    },
    #[error("blob {digest} ({what}) is {size} bytes, over the limit of {limit} bytes")]
    TooBig {
        digest: Digest,
        what: &'static str,
        size: u64,
        limit: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where blobs that are known but not downloaded come from (a registry, for the layers of
/// base images and imported caches).
pub trait BlobSource: Send + Sync {
    /// Whether `d` can be fetched from here.
    fn knows(&self, d: &Digest) -> bool;
    /// Bring `d` into `into`, verified against its digest.
    fn fetch(&self, d: &Digest, into: &BlobStore) -> Result<(), BlobError>;
}

type SharedSource = Arc<RwLock<Option<Arc<dyn BlobSource>>>>;

/// A `blobs/sha256` directory with a temp directory beside it.
#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
    /// Shared by every clone: set once the store knows how to reach registries.
    source: SharedSource,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore").field("dir", &self.dir).finish()
    }
}

/// The start of a scratch name owned by this process: `WHAT-PID-` (see [`scratch_owner`]).
pub fn scratch_prefix(what: &str) -> String {
    format!("{}-{}-", what.trim_end_matches('-'), std::process::id())
}

/// The process that owns a scratch entry named by [`scratch_prefix`], if the name says.
pub fn scratch_owner(name: &str) -> Option<i32> {
    let (_, rest) = name.split_once('-')?;
    let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    pid.parse().ok().filter(|p| *p > 0)
}

/// Whether process `pid` still exists (the owner of scratch, a temp file or a container).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{}", pid)).exists()
}

impl BlobStore {
    /// Open (creating) the blob store in `dir/sha256`, with temp files in `tmp`.
    pub fn open(dir: &Path, tmp: &Path) -> Result<BlobStore, BlobError> {
        let dir = dir.join("sha256");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::create_dir_all(tmp).map_err(io_err(tmp))?;
        Ok(BlobStore {
            dir,
            tmp: tmp.to_path_buf(),
            source: SharedSource::default(),
        })
    }

    /// Fetch blobs this store lacks from `source` when they are needed.
    pub fn set_source(&self, source: Arc<dyn BlobSource>) {
        if let Ok(mut s) = self.source.write() {
            *s = Some(source);
        }
    }

    fn source(&self) -> Option<Arc<dyn BlobSource>> {
        self.source.read().ok().and_then(|s| s.clone())
    }

    /// Whether blob `d` is here, or can be fetched when needed.
    pub fn available(&self, d: &Digest) -> bool {
        self.contains(d) || self.source().is_some_and(|s| s.knows(d))
    }

    /// Whether blob `d` is known but not here (it is fetched when its bytes are needed).
    pub fn is_lazy(&self, d: &Digest) -> bool {
        !self.contains(d) && self.source().is_some_and(|s| s.knows(d))
    }

    /// The path of blob `d`, fetching it first if it is known but not here.
    pub fn ensure(&self, d: &Digest) -> Result<PathBuf, BlobError> {
        let p = self.path(d);
        if p.is_file() {
            return Ok(p);
        }
        match self.source() {
            Some(s) if s.knows(d) => match s.fetch(d, self) {
                Ok(()) if p.is_file() => Ok(p),
                Ok(()) => Err(BlobError::Missing(d.clone())),
                // Another build fetched it meanwhile.
                Err(_) if p.is_file() => Ok(p),
                Err(e) => Err(e),
            },
            _ => Err(BlobError::Missing(d.clone())),
        }
    }

    /// [`BlobStore::ensure`] for several blobs, up to four fetched side by side.
    pub fn ensure_all(&self, digests: &[Digest]) -> Result<(), BlobError> {
        let lazy: Vec<&Digest> = digests.iter().filter(|d| !self.contains(d)).collect();
        if lazy.len() <= 1 {
            return lazy.into_iter().try_for_each(|d| self.ensure(d).map(drop));
        }
        let lazy_count = lazy.len();
        let queue = std::sync::Mutex::new(lazy.into_iter());
        let next = || queue.lock().ok().and_then(|mut q| q.next());
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..lazy_count.min(4))
                .map(|_| {
                    scope.spawn(|| -> Result<(), BlobError> {
                        while let Some(d) = next() {
                            self.ensure(d)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(BlobError::Io {
                        path: self.dir.clone(),
                        source: io::Error::other("a blob fetch panicked"),
                    })
                })
            })
        })
    }

    /// Where blob `d` lives.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// A new temporary file for streaming a blob into; finish with [`BlobStore::commit`].
    pub fn temp_file(&self) -> Result<(PathBuf, File), BlobError> {
        for attempt in 0..100u32 {
            let name = format!("{}{}-{}", scratch_prefix("blob"), nanos(), attempt);
            let p = self.tmp.join(name);
            match fs::OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => return Ok((p, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Err(BlobError::Io {
            path: self.tmp.clone(),
            source: io::Error::other("cannot create a temporary file"),
        })
    }

    /// Move a finished temporary file into place as blob `d` (after syncing it).
    pub fn commit(&self, temp: &Path, file: File, d: &Digest) -> Result<(), BlobError> {
        file.sync_all().map_err(io_err(temp))?;
        drop(file);
        let dest = self.path(d);
        if dest.is_file() {
            let _ = fs::remove_file(temp);
            return Ok(());
        }
        fs::rename(temp, &dest).map_err(io_err(&dest))?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// Store `bytes`, returning their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        let d = Digest::of(bytes);
        if self.contains(&d) {
            return Ok(d);
        }
        let (p, mut f) = self.temp_file()?;
        f.write_all(bytes).map_err(io_err(&p))?;
        self.commit(&p, f, &d)?;
        Ok(d)
    }

    /// Copy a stream into the store, hashing it on the way; returns digest and size.
    pub fn put_reader(&self, r: &mut dyn Read) -> Result<(Digest, u64), BlobError> {
        let (p, f) = self.temp_file()?;
        let mut w = HashingWriter::new(f);
        if let Err(e) = io::copy(r, &mut w) {
            let _ = fs::remove_file(&p);
            return Err(io_err(&p)(e));
        }
        let (d, size, f) = w.finish();
        self.commit(&p, f, &d)?;
        Ok((d, size))
    }

    /// Read a whole blob (fetching it if it is known but not here), verifying it.
    /// [`BlobStore::get`] of a document (`what`: a manifest, a config) that must not be over
    /// `limit` bytes: a bigger one is an error before anything is read into memory.
    pub fn get_bounded(
        &self,
        d: &Digest,
        what: &'static str,
        limit: u64,
    ) -> Result<Vec<u8>, BlobError> {
        self.read(d, Some((what, limit)))
    }

    pub fn get(&self, d: &Digest) -> Result<Vec<u8>, BlobError> {
        self.read(d, None)
    }

    /// Blob `d` read whole and verified; with a bound, its size is checked on the open file
    /// before anything is read.
    fn read(&self, d: &Digest, bound: Option<(&'static str, u64)>) -> Result<Vec<u8>, BlobError> {
        let p = self.ensure(d)?;
        let mut f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                BlobError::Missing(d.clone())
            } else {
                io_err(&p)(e)
            }
        })?;
        let size = f.metadata().map_err(io_err(&p))?.len();
        if let Some((what, limit)) = bound.filter(|(_, limit)| size > *limit) {
            return Err(BlobError::TooBig {
                digest: d.clone(),
                what,
                size,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        f.read_to_end(&mut bytes).map_err(io_err(&p))?;
        let found = Digest::of(&bytes);
        if &found != d {
            return Err(BlobError::Corrupted {
                expected: d.clone(),
                found,
                path: p,
            });
        }
        Ok(bytes)
    }

    /// Re-hash blob `d` from disk without keeping it in memory.
    pub fn verify(&self, d: &Digest) -> Result<u64, BlobError> {
        let p = self.path(d);
        let mut f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                BlobError::Missing(d.clone())
            } else {
                io_err(&p)(e)
            }
        })?;
        let mut w = HashingWriter::new(io::sink());
        io::copy(&mut f, &mut w).map_err(io_err(&p))?;
        let (found, size, _) = w.finish();
        if &found != d {
            return Err(BlobError::Corrupted {
                expected: d.clone(),
                found,
                path: p,
            });
        }
        Ok(size)
    }

    /// Every digest present.
    pub fn list(&self) -> Result<Vec<Digest>, BlobError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            if let Ok(d) = format!("sha256:{}", e.file_name().to_string_lossy()).parse() {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// fsync a directory so a rename in it is durable; best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Ask the kernel to start writing `[from, from + len)` of `file` to disk, without waiting:
/// the fsync of a commit then waits for little. Advice only; a failure changes nothing.
pub fn start_writeback(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a syscall on a descriptor `file` owns, with in-range offsets; it touches no
    // memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// A blob file written front to back, whose pages go to disk while it grows.
///
/// Writeback of each [`WRITE_BEHIND_WINDOW`] starts as soon as the window is written, so the
/// `fsync` before the blob's rename waits for its last window or two, not for all of it, and
/// writes never pile up as dirty pages. Once a blob is past [`KEEP_CACHED`], every window
/// that is on disk and two windows behind is also dropped from the page cache. A big layer
/// then cycles through a few warm pages instead of claiming fresh memory for every byte (on a
/// VM, first-touched memory costs more than the copy into it) and instead of evicting pages
/// that others still read. Blobs up to `KEEP_CACHED` stay cached whole: that covers the
/// layers an edit rebuild reads chunks back from.
pub struct WriteBehind {
    file: File,
    written: u64,
    /// Writeback has been started for `[0, started)`.
    started: u64,
    /// `[0, dropped)` is on disk and out of the page cache.
    dropped: u64,
}

/// How much of a blob [`WriteBehind`] hands to writeback at once.
pub const WRITE_BEHIND_WINDOW: u64 = 8 << 20;
/// Blobs up to this size stay in the page cache whole.
pub const KEEP_CACHED: u64 = 64 << 20;

impl WriteBehind {
    pub fn new(file: File) -> Self {
        WriteBehind {
            file,
            written: 0,
            started: 0,
            dropped: 0,
        }
    }

    /// The file, with all that was written (its tail may not be on disk yet).
    pub fn into_inner(self) -> File {
        self.file
    }

    /// Start writeback of the window after `started`, and drop what is done behind it.
    fn advance(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // Both calls are advice: when one fails, the commit's fsync still decides.
        start_writeback(&self.file, self.started, WRITE_BEHIND_WINDOW);
        self.started += WRITE_BEHIND_WINDOW;
        let behind = self.started.saturating_sub(2 * WRITE_BEHIND_WINDOW);
        if self.written > KEEP_CACHED && behind > self.dropped {
            let (from, len) = (
                self.dropped as libc::off64_t,
                (behind - self.dropped) as libc::off64_t,
            );
            // Pages still under writeback would stay: wait for them first.
            // SAFETY: as above.
            unsafe {
                libc::sync_file_range(
                    fd,
                    from,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
            let _ = nix::fcntl::posix_fadvise(
                fd,
                from,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            self.dropped = behind;
        }
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        while self.written >= self.started + WRITE_BEHIND_WINDOW {
            self.advance();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A name for a temporary file in `dir` (the directory of `path`) that no other writer
/// picks.
fn temp_beside(path: &Path, dir: &Path) -> PathBuf {
    dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        nanos()
    ))
}

/// Replace `path` with `bytes` (temp file beside it, rename) without syncing: for a cache
/// whose reader refuses a damaged file, so that a crash costs at most its contents. Readers
/// never see it half-written.
pub fn replace_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_unsynced_parts(path, &[bytes])
}

/// [`replace_unsynced`] with the bytes given in parts, written one after the other.
pub fn replace_unsynced_parts(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = temp_beside(path, dir);
    let written = File::create(&tmp)
        .and_then(|mut f| parts.iter().try_for_each(|p| f.write_all(p)))
        .and_then(|_| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Write `bytes` to `path` atomically (temp file beside it, sync, rename), unless it already
/// holds exactly them.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    // Unchanged content: nothing to write or sync (no-op rebuilds stay cheap).
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = temp_beside(path, dir);
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // Nothing half-written stays behind (a full disk, a vanished directory).
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of the pages of `file` in `range` are in the page cache.
    fn resident_pages(file: &File, range: std::ops::Range<u64>) -> usize {
        use std::os::fd::AsRawFd;
        let len = (range.end - range.start) as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of `len` bytes of an open file, unmapped below;
        // mincore writes one byte per page into `vec`, which is that long.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                range.start as libc::off_t,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
        }
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn write_behind_keeps_every_byte_and_leaves_only_a_big_blobs_tail_cached() {
        // On the disk the store lives on (not a tmpfs, whose pages cannot be dropped).
        let base = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("tmp");
        fs::create_dir_all(&base).unwrap();
        let t = tempfile::tempdir_in(&base).unwrap();
        let window = WRITE_BEHIND_WINDOW;
        for (name, size) in [
            ("small", KEEP_CACHED / 2),
            ("big", KEEP_CACHED + 5 * window + 12_345),
        ] {
            let path = t.path().join(name);
            let mut w = HashingWriter::new(WriteBehind::new(File::create(&path).unwrap()));
            let mut left = size;
            let mut i = 0u64;
            while left > 0 {
                // Odd sizes, so that windows end inside writes.
                let n = left.min(1_000_003);
                let piece: Vec<u8> = (0..n).map(|j| ((i + j) % 251) as u8).collect();
                w.write_all(&piece).unwrap();
                i += n;
                left -= n;
            }
            let (digest, written, inner) = w.finish();
            inner.into_inner().sync_all().unwrap();
            assert_eq!(written, size);
            let file = File::open(&path).unwrap();
            let first_window = resident_pages(&file, 0..window);
            if name == "small" {
                // Nearly all of it: other tests running beside this one can push a few pages
                // out; a dropped window has none.
                assert!(
                    first_window >= (window / 4096) as usize * 3 / 4,
                    "a small blob stays cached: {first_window} pages"
                );
            } else {
                assert_eq!(first_window, 0, "a big blob's head leaves the cache");
                let last_window = size / window * window - window;
                assert!(
                    resident_pages(&file, last_window..last_window + window) > 0,
                    "the last two windows stay cached"
                );
            }
            // Read back after looking: reading caches the pages again.
            let mut back = HashingWriter::new(io::sink());
            io::copy(&mut File::open(&path).unwrap(), &mut back).unwrap();
            assert_eq!(
                back.finish().0,
                digest,
                "{name}: what was read back differs"
            );
        }
    }

    #[test]
    fn put_get_and_detect_corruption() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path(), &t.path().join("tmp")).unwrap();
        let d = s.put(b"hello").unwrap();
        assert_eq!(s.get(&d).unwrap(), b"hello");
        fs::write(s.path(&d), b"jello").unwrap();
        let e = s.get(&d).unwrap_err().to_string();
        assert!(e.contains("is corrupted"), "{e}");
        assert!(matches!(s.verify(&d), Err(BlobError::Corrupted { .. })));
    }

    /// A source holding some blobs' bytes, counting its fetches.
    struct Remote {
        held: Vec<Vec<u8>>,
        fetches: std::sync::atomic::AtomicUsize,
    }

    impl BlobSource for Remote {
        fn knows(&self, d: &Digest) -> bool {
            self.held.iter().any(|b| &Digest::of(b) == d)
        }
        fn fetch(&self, d: &Digest, into: &BlobStore) -> Result<(), BlobError> {
            self.fetches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let b = self.held.iter().find(|b| &Digest::of(b) == d);
            into.put(b.ok_or_else(|| BlobError::Missing(d.clone()))?)?;
            Ok(())
        }
    }

    #[test]
    fn known_blobs_are_fetched_once_when_first_needed() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path(), &t.path().join("tmp")).unwrap();
        let held: Vec<Vec<u8>> = (0..5)
            .map(|i| format!("layer {}", i).into_bytes())
            .collect();
        let digests: Vec<Digest> = held.iter().map(|b| Digest::of(b)).collect();
        let unknown = Digest::of(b"nobody has this");
        let remote = Arc::new(Remote {
            held,
            fetches: Default::default(),
        });
        assert!(!s.available(&digests[0]), "no source yet");
        // A clone made before the source is set sees it too.
        let clone = s.clone();
        s.set_source(remote.clone());
        assert!(clone.available(&digests[0]) && clone.is_lazy(&digests[0]));
        assert!(!s.contains(&digests[0]));
        assert!(!s.available(&unknown));
        assert!(matches!(s.ensure(&unknown), Err(BlobError::Missing(_))));
        assert_eq!(s.get(&digests[0]).unwrap(), b"layer 0");
        assert!(s.contains(&digests[0]) && !s.is_lazy(&digests[0]));
        s.ensure_all(&digests).unwrap();
        assert!(digests.iter().all(|d| s.contains(d)));
        s.ensure_all(&digests).unwrap();
        assert_eq!(
            remote.fetches.load(std::sync::atomic::Ordering::Relaxed),
            5,
            "each blob is fetched once"
        );
    }
}
