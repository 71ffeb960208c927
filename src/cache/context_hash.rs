//! Content digests of what COPY, ADD and bind mounts read from the build context. Only the
//! referenced paths are walked; files are hashed in parallel; a persistent stat cache (size,
//! mtime, ctime, inode, device -> sha256) lets an unchanged file skip re-hashing, but is never
//! trusted for a file changed within the last seconds (its ctime could still move without a
//! visible change). Each file is hashed at most once per build.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use nix::sys::stat::FileStat;

use crate::attest::trace::{ContextLeaf, ContextListing};
use crate::oci::at::SourceStat;
use crate::oci::blobs::replace_unsynced;
use crate::oci::digest::HashingWriter;

/// Seconds a file's ctime must be in the past before its stat-cache entry is trusted.
const RACY_SECONDS: i64 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
struct StatEntry {
    /// The file's metadata when it was hashed.
    seen: Fingerprint,
    sha256: [u8; 32],
    /// The file had no xattrs (but SELinux's) when it was hashed. Setting one changes the
    /// ctime, so while the entry matches, they need not be listed again.
    bare: bool,
}

/// The stat cache file: this magic, an entry count, then per entry the path's length and
/// bytes and the fixed fields (little-endian), the sha256 and the `bare` flag. A file that
/// does not parse is an empty cache (every file is hashed again).
const STAT_MAGIC: &[u8; 8] = b"bstat01\n";
/// A path longer than this is no path (a damaged file).
const STAT_MAX_PATH: usize = 1 << 16;

/// The fewest bytes an entry of the file takes (an empty path).
const STAT_MIN_ENTRY: u64 = 8 + 7 * 8 + 32 + 1;

/// The stat cache in memory, keyed by the bytes of each file's absolute path.
type StatMap = HashMap<Vec<u8>, StatEntry>;

/// Read a stat cache of `file_len` bytes.
fn read_stat_cache(r: &mut impl io::Read, file_len: u64) -> io::Result<StatMap> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != STAT_MAGIC {
        return Err(io::Error::other("not a stat cache"));
    }
    let mut word = [0u8; 8];
    r.read_exact(&mut word)?;
    let count = u64::from_le_bytes(word);
    // Sized once (no rehashing, whose old and new tables would coexist), but never beyond
    // what the file can hold: a damaged count cannot reserve memory.
    let mut map = HashMap::with_capacity(count.min(file_len / STAT_MIN_ENTRY) as usize);
    for _ in 0..count {
        let (path, e) = read_stat_entry(r)?;
        map.insert(path, e);
    }
    Ok(map)
}

/// One entry: the path's length and bytes, the fixed fields, the sha256 and `bare`.
fn read_stat_entry(r: &mut impl io::Read) -> io::Result<(Vec<u8>, StatEntry)> {
    let mut word = [0u8; 8];
    let mut u64_of = |r: &mut dyn io::Read| -> io::Result<u64> {
        r.read_exact(&mut word)?;
        Ok(u64::from_le_bytes(word))
    };
    let len = u64_of(r)? as usize;
    if len > STAT_MAX_PATH {
        return Err(io::Error::other("damaged stat cache"));
    }
    let mut path = vec![0u8; len];
    r.read_exact(&mut path)?;
    let seen = Fingerprint {
        size: u64_of(r)?,
        mtime: u64_of(r)? as i64,
        mtime_ns: u64_of(r)? as i64,
        ctime: u64_of(r)? as i64,
        ctime_ns: u64_of(r)? as i64,
        ino: u64_of(r)?,
        dev: u64_of(r)?,
    };
    let mut sha256 = [0u8; 32];
    r.read_exact(&mut sha256)?;
    let mut bare = [0u8; 1];
    r.read_exact(&mut bare)?;
    Ok((
        path,
        StatEntry {
            seen,
            sha256,
            bare: bare[0] == 1,
        },
    ))
}

fn write_stat_entry(out: &mut Vec<u8>, path: &[u8], e: &StatEntry) {
    out.extend_from_slice(&(path.len() as u64).to_le_bytes());
    out.extend_from_slice(path);
    for v in [
        e.seen.size,
        e.seen.mtime as u64,
        e.seen.mtime_ns as u64,
        e.seen.ctime as u64,
        e.seen.ctime_ns as u64,
        e.seen.ino,
        e.seen.dev,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&e.sha256);
    out.push(e.bare as u8);
}

fn write_stat_cache(map: &StatMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + map.len() * 128);
    out.extend_from_slice(STAT_MAGIC);
    out.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for (path, e) in map {
        write_stat_entry(&mut out, path, e);
    }
    out
}

/// Apply the journal beside the stat cache (entries appended since it was last written, in
/// the entry format, newest last) to `map`; returns how many it held. A torn or damaged
/// tail ends the journal there.
fn read_stat_journal(r: &mut impl io::Read, map: &mut StatMap) -> usize {
    let mut n = 0;
    while let Ok((path, e)) = read_stat_entry(r) {
        map.insert(path, e);
        n += 1;
    }
    n
}

/// What a stat-cache entry is matched on: size, times to the nanosecond, inode and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    size: u64,
    mtime: i64,
    mtime_ns: i64,
    ctime: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

impl Fingerprint {
    fn of_metadata(md: &fs::Metadata) -> Fingerprint {
        Fingerprint {
            size: md.len(),
            mtime: md.mtime(),
            mtime_ns: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_ns: md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
        }
    }

    fn of_stat(st: &nix::sys::stat::FileStat) -> Fingerprint {
        Fingerprint {
            size: st.st_size as u64,
            mtime: st.st_mtime,
            mtime_ns: st.st_mtime_nsec,
            ctime: st.st_ctime,
            ctime_ns: st.st_ctime_nsec,
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }
}

/// The bytes of an entry's path relative to the context: `rel` itself, unless it lost bytes
/// to UTF-8 replacement, then the same number of trailing components of its path on disk, as
/// they are. Two names that differ only in invalid UTF-8 must never share a key.
fn exact_rel<'a>(rel: &'a str, path: &Path) -> std::borrow::Cow<'a, [u8]> {
    if !rel.contains(char::REPLACEMENT_CHARACTER) {
        return std::borrow::Cow::Borrowed(rel.as_bytes());
    }
    let depth = rel.split('/').count();
    let mut parts: Vec<&[u8]> = path
        .iter()
        .rev()
        .take(depth)
        .map(|c| c.as_bytes())
        .collect();
    parts.reverse();
    let out = parts.join(&b'/');
    std::borrow::Cow::Owned(out)
}

/// A probed entry's kind, as its record names it.
fn kind_char(st: &SourceStat) -> char {
    match st.kind() {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFREG => 'f',
        _ => 'o',
    }
}

/// `sha256:` and the hex of `sha256` (one allocation: this runs for every context file).
/// The bytes of a `sha256:<hex>` digest string.
fn sha256_bytes(digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(digest.strip_prefix("sha256:")?, &mut out).ok()?;
    Some(out)
}

fn sha256_digest_string(sha256: &[u8; 32]) -> String {
    let mut out = [0u8; 7 + 64];
    out[..7].copy_from_slice(b"sha256:");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in sha256.iter().enumerate() {
        out[7 + 2 * i] = HEX[(b >> 4) as usize];
        out[8 + 2 * i] = HEX[(b & 0xf) as usize];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path's xattrs but `security.selinux` (the host's labelling policy, not content).
fn xattrs_of(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut xattrs = crate::oci::layer::read_xattrs(path);
    xattrs.retain(|(k, _)| k != "security.selinux");
    xattrs
}

/// Entries are stat'ed, and their part of the listing key hashed, in blocks of this many, on
/// up to `jobs` threads (the key does not depend on the number of threads).
const STAT_BLOCK: usize = 2048;

/// Every context entry's `lstat`, with what a build that changed nothing finds its last
/// listing by.
pub struct Statted {
    pub stats: Vec<FileStat>,
    /// BLAKE3 of each block's paths and their whole `lstat` but the atime.
    blocks: Vec<[u8; 32]>,
    /// Some entry changed within [`RACY_SECONDS`]: it could still change unseen.
    racy: bool,
}

/// The wall clock in seconds, as ctimes are compared with it.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One block's stats, its BLAKE3 and whether any entry in it is racy.
type StatBlock = (Vec<FileStat>, [u8; 32], bool);

/// One block of [`ContextHasher::stat_all`].
fn stat_block(part: &[(String, PathBuf)], now: i64) -> io::Result<(Vec<FileStat>, [u8; 32], bool)> {
    let mut dirs = crate::oci::at::DirCursor::default();
    let mut stats = Vec::with_capacity(part.len());
    // Gathered, then hashed at once (BLAKE3 is fast on long inputs, slow on many short ones).
    let mut seen = Vec::with_capacity(part.len() * 160);
    let mut racy = false;
    for (rel, path) in part {
        let st = dirs.lstat(path)?;
        let path = path.as_os_str().as_bytes();
        seen.extend_from_slice(&(rel.len() as u64).to_le_bytes());
        seen.extend_from_slice(rel.as_bytes());
        seen.extend_from_slice(&(path.len() as u64).to_le_bytes());
        seen.extend_from_slice(path);
        for v in [
            st.st_dev,
            st.st_ino,
            st.st_mode as u64,
            st.st_uid as u64,
            st.st_gid as u64,
            st.st_rdev,
            st.st_size as u64,
            st.st_mtime as u64,
            st.st_mtime_nsec as u64,
            st.st_ctime as u64,
            st.st_ctime_nsec as u64,
        ] {
            seen.extend_from_slice(&v.to_le_bytes());
        }
        racy |= now - st.st_ctime < RACY_SECONDS;
        stats.push(st);
    }
    Ok((stats, *blake3::hash(&seen).as_bytes(), racy))
}

/// What a context read recorded, kept for the next build that reads the same unchanged
/// entries (`cache/listings/<slot>`): the build then skips describing them leaf by leaf.
#[derive(Debug, Clone)]
pub struct Remembered {
    /// The content digest [`ContextHasher::describe_leaves`] gave.
    pub digest: String,
    /// Each source's leaves digest, in order.
    pub sources: Vec<String>,
    pub listing: ContextListing,
}

/// A listing file: this magic, the key, the fields length-prefixed, and BLAKE3 of all that
/// before it (a torn or damaged file is no listing).
const LISTING_MAGIC: &[u8; 10] = b"blisting1\n";

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn take_u64(input: &mut &[u8]) -> Option<u64> {
    let (word, rest) = input.split_first_chunk::<8>()?;
    *input = rest;
    Some(u64::from_le_bytes(*word))
}

fn take_bytes<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_u64(input)?).ok()?;
    if len > input.len() {
        return None;
    }
    let (b, rest) = input.split_at(len);
    *input = rest;
    Some(b)
}

fn take_string(input: &mut &[u8]) -> Option<String> {
    take_bytes(input).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

fn encode_listing(key: &[u8; 32], r: &Remembered) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.listing.json.len() + 1024);
    out.extend_from_slice(LISTING_MAGIC);
    out.extend_from_slice(key);
    put_bytes(&mut out, r.digest.as_bytes());
    out.extend_from_slice(&(r.sources.len() as u64).to_le_bytes());
    for d in &r.sources {
        put_bytes(&mut out, d.as_bytes());
    }
    put_bytes(&mut out, r.listing.digest.to_string().as_bytes());
    put_bytes(&mut out, r.listing.first.as_bytes());
    put_bytes(&mut out, r.listing.last.as_bytes());
    put_bytes(&mut out, &r.listing.json);
    let check = blake3::hash(&out);
    out.extend_from_slice(check.as_bytes());
    out
}

/// The listing in `bytes` if it is whole and recorded under `key` (its JSON, last, is kept
/// in place: it can be tens of MB).
fn decode_listing(mut bytes: Vec<u8>, key: &[u8; 32]) -> Option<Remembered> {
    let (body, check) = bytes.split_last_chunk::<32>()?;
    let rest = body.strip_prefix(LISTING_MAGIC.as_slice())?;
    let (stored, mut rest) = rest.split_first_chunk::<32>()?;
    if stored != key || blake3::hash(body).as_bytes() != check {
        return None;
    }
    let digest = take_string(&mut rest)?;
    let count = take_u64(&mut rest)?;
    let mut sources = Vec::new();
    for _ in 0..count {
        sources.push(take_string(&mut rest)?);
    }
    let listing_digest = take_string(&mut rest)?.parse().ok()?;
    let first = take_string(&mut rest)?;
    let last = take_string(&mut rest)?;
    let json_len = take_bytes(&mut rest)?.len();
    if !rest.is_empty() {
        return None;
    }
    let json_end = bytes.len() - 32;
    bytes.truncate(json_end);
    bytes.drain(..json_end - json_len);
    Some(Remembered {
        digest,
        sources,
        listing: ContextListing {
            json: std::sync::Arc::new(bytes),
            digest: listing_digest,
            first,
            last,
        },
    })
}

/// What one context entry is, as [`ContextHasher::describe_leaves`] reads it.
struct Probe {
    md: SourceStat,
    /// A symlink's target.
    link: Vec<u8>,
    /// Its xattrs but `security.selinux` (the host's labelling policy).
    xattrs: Vec<(String, Vec<u8>)>,
    /// Its content digest (`sha256:<hex>`), when the stat cache (or this build) knows it.
    cached: Option<String>,
}

/// The file one context read's listing is kept in (`cache/listings/<slot>`).
pub struct ListingSlot(PathBuf);

impl ListingSlot {
    /// Keep what the read recorded, under `key` (a lost write only costs describing the
    /// entries again).
    pub fn remember(&self, key: &[u8; 32], r: &Remembered) {
        if let Some(dir) = self.0.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let _ = replace_unsynced(&self.0, &encode_listing(key, r));
    }
}

/// Hashes context files, remembering results in `cache/stat.bin` under the store.
pub struct ContextHasher {
    path: PathBuf,
    listings: PathBuf,
    stat: RwLock<StatMap>,
    /// Whether `stat.bin` was read, and how many entries its journal (`stat.log`) held.
    loaded: AtomicBool,
    journaled: std::sync::atomic::AtomicUsize,
    /// Files hashed by this build not yet saved.
    fresh: Mutex<Vec<Vec<u8>>>,
    /// Whether `stat.bin` is still to be read: only when a step's context changed (a no-op
    /// build takes its listings and never needs it).
    unread: Mutex<bool>,
    this_build: RwLock<HashMap<PathBuf, String>>,
    dirty: AtomicBool,
    jobs: usize,
}

impl Drop for ContextHasher {
    fn drop(&mut self) {
        let stat = self.stat.get_mut().map(std::mem::take).unwrap_or_default();
        super::free_aside(stat);
    }
}

impl ContextHasher {
    /// The hasher whose stat cache is the file `stats` (its journal beside it), and whose
    /// context listings are kept in `listings`.
    pub fn open(stats: &Path, listings: &Path, jobs: usize) -> ContextHasher {
        ContextHasher {
            path: stats.to_path_buf(),
            listings: listings.to_path_buf(),
            stat: RwLock::new(StatMap::new()),
            loaded: AtomicBool::new(false),
            journaled: 0.into(),
            fresh: Mutex::new(Vec::new()),
            unread: Mutex::new(true),
            this_build: RwLock::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            jobs: jobs.max(1),
        }
    }

    /// The stat cache, once it is read (an unreadable one is empty).
    fn loaded_stat(&self) -> &RwLock<StatMap> {
        if let Ok(mut unread) = self.unread.lock() {
            if std::mem::take(&mut *unread) {
                // Parsed as it is read: for a large context the file is tens of MB, and
                // holding its bytes beside the parsed map would double the peak memory.
                let read = fs::File::open(&self.path).ok().and_then(|f| {
                    let len = f.metadata().ok()?.len();
                    read_stat_cache(&mut io::BufReader::with_capacity(1 << 20, f), len).ok()
                });
                let loaded = read.is_some();
                let mut map = read.unwrap_or_default();
                let journaled = match fs::File::open(self.path.with_file_name("stat.log")) {
                    Ok(f) if loaded => {
                        read_stat_journal(&mut io::BufReader::with_capacity(1 << 16, f), &mut map)
                    }
                    _ => 0,
                };
                if let Ok(mut stat) = self.stat.write() {
                    *stat = map;
                }
                self.loaded.store(loaded, Ordering::Relaxed);
                self.journaled.store(journaled, Ordering::Relaxed);
            }
        }
        &self.stat
    }

    /// Save what this build hashed (a lost update only costs re-hashing). A few files are
    /// appended to the journal; many, or a journal grown to an eighth of the cache, rewrite
    /// the cache whole (atomically, and the journal is dropped).
    pub fn save(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let (Ok(stat), Ok(mut fresh)) = (self.loaded_stat().read(), self.fresh.lock()) else {
            return;
        };
        let journal = self.path.with_file_name("stat.log");
        let journaled = self.journaled.load(Ordering::Relaxed) + fresh.len();
        let appended =
            (self.loaded.load(Ordering::Relaxed) && journaled * 8 <= stat.len()).then(|| {
                let mut out = Vec::new();
                for path in fresh.iter() {
                    if let Some(e) = stat.get(path) {
                        write_stat_entry(&mut out, path, e);
                    }
                }
                // One write: concurrent builds appending interleave whole entries.
                fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&journal)
                    .and_then(|mut f| io::Write::write_all(&mut f, &out))
            });
        if matches!(appended, Some(Ok(()))) {
            self.journaled.store(journaled, Ordering::Relaxed);
        } else {
            // A damaged file reads as empty.
            if replace_unsynced(&self.path, &write_stat_cache(&stat)).is_ok() {
                let _ = fs::remove_file(&journal);
                self.loaded.store(true, Ordering::Relaxed);
                self.journaled.store(0, Ordering::Relaxed);
            }
            // The JSON file earlier versions kept.
            let _ = fs::remove_file(self.path.with_file_name("stat.json"));
        }
        fresh.clear();
    }

    /// Hash `path` (whose metadata is `md`) and remember it; returns `sha256:<hex>`.
    fn hash_file(&self, path: &Path) -> io::Result<String> {
        // Opened without following a symlink, and described by what was opened: a file
        // swapped for a link after the walk is refused, never read through.
        let mut f = crate::oci::at::open_regular(path)?;
        let md = &f.metadata()?;
        let mut w = HashingWriter::new(io::sink());
        // Read in large pieces (io::copy reads 8 KiB at a time): one read for most files,
        // a hundred for a 100 MB one.
        let mut buf = vec![0u8; usize::try_from(md.len()).unwrap_or(0).clamp(4096, 1 << 20)];
        crate::oci::tar::copy_in_pieces(&mut f, &mut w, &mut buf)?;
        let (d, _, _) = w.finish();
        let digest = d.to_string();
        let mut sha256 = [0u8; 32];
        if hex::decode_to_slice(d.hex(), &mut sha256).is_err() {
            return Ok(digest);
        }
        if let Ok(mut tb) = self.this_build.write() {
            tb.insert(path.to_path_buf(), digest.clone());
        }
        let fp = Fingerprint::of_metadata(md);
        if let Ok(mut fresh) = self.fresh.lock() {
            fresh.push(path.as_os_str().as_bytes().to_vec());
        }
        if let Ok(mut stat) = self.loaded_stat().write() {
            stat.insert(
                path.as_os_str().as_bytes().to_vec(),
                StatEntry {
                    seen: fp,
                    sha256,
                    bare: xattrs_of(path).is_empty(),
                },
            );
        }
        self.dirty.store(true, Ordering::Relaxed);
        Ok(digest)
    }

    /// [`ContextHasher::probe_all`] of one contiguous slice, on one thread.
    fn probe_slice(
        &self,
        part: &[(String, PathBuf)],
        stats: &[FileStat],
        now: i64,
    ) -> io::Result<Vec<Probe>> {
        // Read once per slice: hashing (which writes) only starts after every probe.
        let stat = self
            .loaded_stat()
            .read()
            .map_err(|_| io::Error::other("the stat cache lock is poisoned"))?;
        let this_build = self
            .this_build
            .read()
            .map_err(|_| io::Error::other("the stat cache lock is poisoned"))?;
        let mut out = Vec::with_capacity(part.len());
        for ((_, path), st) in part.iter().zip(stats) {
            let md = SourceStat::of(st);
            let link = if kind_char(&md) == 'l' {
                fs::read_link(path)
                    .map(|l| l.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            // The file's content hash if it is known (from this build, or a stat-cache entry
            // that still matches), and whether the entry says it has no xattrs.
            let cached = if kind_char(&md) != 'f' {
                None
            } else if let Some(h) = (!this_build.is_empty())
                .then(|| this_build.get(path))
                .flatten()
            {
                Some((h.clone(), false))
            } else if now - st.st_ctime < RACY_SECONDS {
                None
            } else {
                stat.get(path.as_os_str().as_bytes())
                    .filter(|e| e.seen == Fingerprint::of_stat(st))
                    .map(|e| (sha256_digest_string(&e.sha256), e.bare))
            };
            let xattrs = match &cached {
                Some((_, true)) => Vec::new(),
                _ => xattrs_of(path),
            };
            out.push(Probe {
                md,
                link,
                xattrs,
                cached: cached.map(|(h, _)| h),
            });
        }
        Ok(out)
    }

    /// Every entry's metadata, link target, xattrs and known content hash, on up to `jobs`
    /// threads over contiguous slices, in order.
    fn probe_all(
        &self,
        entries: &[(String, PathBuf)],
        stats: &[FileStat],
        now: i64,
    ) -> io::Result<Vec<Probe>> {
        // Below this, threads cost more than they save.
        const PER_THREAD: usize = 512;
        let threads = self.jobs.min(entries.len() / PER_THREAD).max(1);
        if threads == 1 {
            return self.probe_slice(entries, stats, now);
        }
        let size = entries.len().div_ceil(threads);
        let parts: Vec<io::Result<Vec<Probe>>> = std::thread::scope(|s| {
            let handles: Vec<_> = entries
                .chunks(size)
                .zip(stats.chunks(size))
                .map(|(part, st)| s.spawn(move || self.probe_slice(part, st, now)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a hashing thread panicked")))
                })
                .collect()
        });
        let mut out = Vec::with_capacity(entries.len());
        for part in parts {
            out.extend(part?);
        }
        Ok(out)
    }

    /// `lstat` of every entry (`rel` -> on-disk path), in parallel: all that a build whose
    /// context did not change reads of it.
    pub fn stat_all(&self, entries: &[(String, PathBuf)]) -> io::Result<Statted> {
        let now = now_secs();
        let blocks: Vec<&[(String, PathBuf)]> = entries.chunks(STAT_BLOCK).collect();
        let done: Vec<Mutex<Option<io::Result<StatBlock>>>> =
            blocks.iter().map(|_| Mutex::new(None)).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(part) = blocks.get(i) else { break };
            let r = stat_block(part, now);
            if let Ok(mut slot) = done[i].lock() {
                *slot = Some(r);
            }
        };
        let threads = self.jobs.min(blocks.len());
        if threads <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(work);
                }
            });
        }
        let mut out = Statted {
            stats: Vec::with_capacity(entries.len()),
            blocks: Vec::with_capacity(blocks.len()),
            racy: false,
        };
        for d in done {
            let (stats, hash, racy) = d
                .into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(io::Error::other("a stat thread panicked")))?;
            out.stats.extend(stats);
            out.blocks.push(hash);
            out.racy |= racy;
        }
        Ok(out)
    }

    /// The key the listing of `statted` entries is remembered under: what names the read
    /// (`slot`: the context, its sources, the epoch...), where each source's entries end,
    /// and every entry's path and metadata. `None` when an entry changed too recently to be
    /// trusted unchanged (as the stat cache: same inode, size, mtime and ctime, same
    /// content, link target and xattrs).
    pub fn listing_key(&self, statted: &Statted, slot: &[u8], ends: &[usize]) -> Option<[u8; 32]> {
        if statted.racy {
            return None;
        }
        let mut h = blake3::Hasher::new();
        // What a listing holds is what the keys are made of: it goes with their version.
        h.update(b"builder context listing v1\0");
        h.update(&super::KEY_VERSION.to_le_bytes());
        h.update(&(slot.len() as u64).to_le_bytes());
        h.update(slot);
        for e in ends {
            h.update(&(*e as u64).to_le_bytes());
        }
        for b in &statted.blocks {
            h.update(b);
        }
        Some(*h.finalize().as_bytes())
    }

    fn listing_path(&self, slot: &[u8]) -> PathBuf {
        self.listings.join(blake3::hash(slot).to_hex().as_str())
    }

    /// What the last read of `slot` recorded, if it was of entries with this `key`.
    pub fn recall(&self, slot: &[u8], key: &[u8; 32]) -> Option<Remembered> {
        decode_listing(fs::read(self.listing_path(slot)).ok()?, key)
    }

    /// Where what a read of `slot` recorded is kept for the next build.
    pub fn listing_slot(&self, slot: &[u8]) -> ListingSlot {
        ListingSlot(self.listing_path(slot))
    }

    /// The digest of a set of context entries (`rel` -> on-disk path) for a cache key, and
    /// each entry as provenance records it: type, mode, owner, size, link target, xattrs,
    /// content digest, and the mtime as it will appear in the layer (clamped to `epoch`).
    ///
    /// The key must be the same on any machine for the same context, so an owner is written
    /// as `=` when it is `owner` (the context directory's: whoever checked it out), and
    /// `security.selinux` (the host's labelling policy) is left out; a file whose owner was
    /// changed still changes the key.
    ///
    /// When a file had to be hashed (something changed: the step will likely run), each
    /// entry's `lstat` comes back too, so the step need not stat the files again.
    pub fn describe_leaves(
        &self,
        entries: &[(String, PathBuf)],
        stats: &[FileStat],
        epoch: i64,
        owner: (u32, u32),
    ) -> io::Result<(String, Vec<ContextLeaf>, Option<Vec<SourceStat>>)> {
        let now = now_secs();
        // Every entry's metadata, link target and xattrs, and the stat cache's answer, in
        // parallel over contiguous slices (a no-op build of a large context is these calls).
        let mut probes = self.probe_all(entries, stats, now)?;
        let mut hashes: Vec<Option<String>> = probes.iter_mut().map(|p| p.cached.take()).collect();
        let todo: Vec<usize> = probes
            .iter()
            .enumerate()
            .filter(|(i, p)| kind_char(&p.md) == 'f' && hashes[*i].is_none())
            .map(|(i, _)| i)
            .collect();
        // Hash the rest in parallel.
        let results: Mutex<Vec<(usize, io::Result<String>)>> = Mutex::new(Vec::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..self.jobs.min(todo.len()) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { break };
                    // Only files to hash are stat'ed again, for the stat cache's record.
                    let r = self.hash_file(&entries[i].1);
                    if let Ok(mut v) = results.lock() {
                        v.push((i, r));
                    }
                });
            }
        });
        for (i, r) in results.into_inner().unwrap_or_default() {
            hashes[i] = Some(r?);
        }
        // Explicit encoding, one record per entry, straight into the hash: a field separator
        // (0x1f) between fields and a record separator (0x1e) after each; paths are UTF-8 from
        // the context walk, so neither byte can occur inside a field except in file names,
        // which are length-prefixed.
        let mut h = HashingWriter::new(io::sink());
        let mut leaves = Vec::with_capacity(entries.len());
        let mut rec: Vec<u8> = Vec::with_capacity(512);
        for (i, ((rel, _), probe)) in entries.iter().zip(&probes).enumerate() {
            use std::io::Write as _;
            let md = &probe.md;
            let kind = kind_char(md);
            let link = &probe.link;
            // Into memory: these writes cannot fail.
            rec.clear();
            let name = exact_rel(rel, &entries[i].1);
            let _ = write!(rec, "{}:", name.len());
            rec.extend_from_slice(&name);
            let _ = write!(rec, "\x1f{}\x1f{:o}\x1f", kind, md.mode & 0o7777);
            let _ = if md.uid == owner.0 {
                write!(rec, "=\x1f")
            } else {
                write!(rec, "{}\x1f", md.uid)
            };
            let _ = if md.gid == owner.1 {
                write!(rec, "=\x1f")
            } else {
                write!(rec, "{}\x1f", md.gid)
            };
            let _ = write!(
                rec,
                "{}\x1f{}:",
                if kind == 'f' { md.size } else { 0 },
                link.len()
            );
            // The target's own bytes: two links that differ only in invalid UTF-8 differ here.
            rec.extend_from_slice(link);
            let _ = write!(
                rec,
                "\x1f{}\x1f{}",
                hashes[i]
                    .as_deref()
                    .and_then(|h| h.strip_prefix("sha256:"))
                    .unwrap_or_default(),
                md.mtime.min(epoch)
            );
            for (k, v) in &probe.xattrs {
                rec.push(0x1f);
                let _ = write!(rec, "x{}:{}", k.len(), k);
                rec.extend_from_slice(hex::encode(v).as_bytes());
            }
            rec.push(0x1e);
            io::Write::write_all(&mut h, &rec)?;
            leaves.push(ContextLeaf {
                kind: match kind {
                    'd' => "dir",
                    'l' => "symlink",
                    'f' => "file",
                    _ => "other",
                },
                mode: md.mode & 0o7777,
                // Taken, not copied: a large context's hashes are freed as they are recorded.
                content: hashes[i].take(),
                link: (kind == 'l').then(|| String::from_utf8_lossy(link).into_owned()),
                mtime: (md.mtime < epoch).then_some(md.mtime),
            });
        }
        let (d, _, _) = h.finish();
        // Each file's stat goes with its content digest: a COPY of these files then need
        // not read the ones whose tar bytes it already holds.
        let stats = (!todo.is_empty()).then(|| {
            probes
                .iter()
                .zip(&leaves)
                .map(|(p, leaf)| SourceStat {
                    content: leaf.content.as_deref().and_then(sha256_bytes),
                    ..p.md
                })
                .collect()
        });
        drop(probes);
        drop(hashes);
        Ok((d.to_string(), leaves, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_strings_are_the_sha256_hex() {
        let sha: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        assert_eq!(
            sha256_digest_string(&sha),
            format!("sha256:{}", hex::encode(sha))
        );
    }

    #[test]
    fn a_few_new_hashes_are_journaled_and_read_back_with_the_cache() {
        let store = tempfile::tempdir().unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let entries: Vec<(String, PathBuf)> = (0..20)
            .map(|i| {
                let p = ctx.path().join(format!("f{}", i));
                fs::write(&p, format!("file {}", i)).unwrap();
                (format!("f{}", i), p)
            })
            .collect();
        let journal = store.path().join("stat.log");
        let h = ContextHasher::open(
            &store.path().join("stat.bin"),
            &store.path().join("listings"),
            2,
        );
        let st = h.stat_all(&entries[..19]).unwrap().stats;
        h.describe_leaves(&entries[..19], &st, 0, (0, 0)).unwrap();
        h.save();
        assert!(!journal.exists(), "the first save writes the cache whole");
        // Entries of files changed in the last seconds are not trusted (so hashed again).
        std::thread::sleep(std::time::Duration::from_secs_f64(
            RACY_SECONDS as f64 + 0.1,
        ));
        let h = ContextHasher::open(
            &store.path().join("stat.bin"),
            &store.path().join("listings"),
            2,
        );
        assert_eq!(h.loaded_stat().read().unwrap().len(), 19);
        let st = h.stat_all(&entries).unwrap().stats;
        h.describe_leaves(&entries, &st, 0, (0, 0)).unwrap();
        h.save();
        let appended = fs::metadata(&journal).unwrap().len();
        assert!(
            appended > 0 && appended < 200,
            "one entry appended: {} bytes",
            appended
        );
        let h = ContextHasher::open(
            &store.path().join("stat.bin"),
            &store.path().join("listings"),
            2,
        );
        assert_eq!(h.loaded_stat().read().unwrap().len(), 20);
        // A torn last entry is ignored; what came before it still counts.
        let mut torn = fs::read(&journal).unwrap();
        torn.extend_from_slice(&torn.clone()[..40]);
        fs::write(&journal, &torn).unwrap();
        let h = ContextHasher::open(
            &store.path().join("stat.bin"),
            &store.path().join("listings"),
            2,
        );
        assert_eq!(h.loaded_stat().read().unwrap().len(), 20);
        assert_eq!(h.journaled.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_listing_is_recalled_by_its_key_until_an_entry_changes() {
        let store = tempfile::tempdir().unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let entries: Vec<(String, PathBuf)> = (0..3 * STAT_BLOCK + 7)
            .map(|i| (format!("f{}", i), ctx.path().join(format!("f{}", i))))
            .collect();
        for (_, p) in &entries {
            fs::write(p, "x").unwrap();
        }
        let h = ContextHasher::open(
            &store.path().join("stat.bin"),
            &store.path().join("listings"),
            2,
        );
        let key_now = |h: &ContextHasher| {
            let st = h.stat_all(&entries).unwrap();
            assert_eq!(st.stats.len(), entries.len());
            assert_eq!(st.stats[STAT_BLOCK + 1].st_size, 1);
            h.listing_key(&st, b"slot", &[entries.len()])
        };
        assert_eq!(key_now(&h), None, "just written: too recent to trust");
        std::thread::sleep(std::time::Duration::from_secs_f64(
            RACY_SECONDS as f64 + 0.1,
        ));
        let key = key_now(&h).unwrap();
        let single = ContextHasher::open(
            &store.path().join("stat.bin"),
            &store.path().join("listings"),
            1,
        );
        assert_eq!(
            key_now(&single),
            Some(key),
            "the key does not depend on threads"
        );
        let mut leaves = std::collections::BTreeMap::new();
        leaves.insert(
            "f0".to_string(),
            ContextLeaf {
                kind: "file",
                mode: 0o644,
                content: Some("sha256:00".into()),
                link: None,
                mtime: None,
            },
        );
        let r = Remembered {
            digest: "sha256:11".into(),
            sources: vec!["sha256:22".into()],
            listing: ContextListing::of(&leaves),
        };
        h.listing_slot(b"slot").remember(&key, &r);
        let back = h.recall(b"slot", &key).unwrap();
        assert_eq!((&back.digest, &back.sources), (&r.digest, &r.sources));
        assert_eq!(back.listing.json, r.listing.json);
        assert_eq!(back.listing.digest, r.listing.digest);
        assert_eq!(back.listing.last, "f0");
        assert!(h.recall(b"other slot", &key).is_none());
        // A damaged file is no listing.
        let file = h.listing_path(b"slot");
        let mut bytes = fs::read(&file).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        fs::write(&file, &bytes).unwrap();
        assert!(h.recall(b"slot", &key).is_none());
        // Any change to an entry's metadata (here its mode) is another key.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&entries[5].1, fs::Permissions::from_mode(0o600)).unwrap();
        std::thread::sleep(std::time::Duration::from_secs_f64(
            RACY_SECONDS as f64 + 0.1,
        ));
        assert_ne!(key_now(&h), Some(key));
    }

    #[test]
    fn the_stat_cache_round_trips_and_a_damaged_one_is_empty() {
        let mut map = HashMap::new();
        map.insert(
            b"/ctx/src/a.txt".to_vec(),
            StatEntry {
                seen: Fingerprint {
                    size: 5,
                    mtime: -3,
                    mtime_ns: 999_999_999,
                    ctime: 1_700_000_000,
                    ctime_ns: 1,
                    ino: u64::MAX,
                    dev: 66306,
                },
                sha256: [7; 32],
                bare: true,
            },
        );
        map.insert(
            "/ctx/é".as_bytes().to_vec(),
            StatEntry {
                bare: false,
                ..map[&b"/ctx/src/a.txt".to_vec()].clone()
            },
        );
        let bytes = write_stat_cache(&map);
        assert_eq!(
            read_stat_cache(&mut &bytes[..], bytes.len() as u64).unwrap(),
            map
        );
        // Cut anywhere, or with a huge path length, it is refused (the build re-hashes).
        for cut in [0, 7, 8, 20, bytes.len() - 1] {
            assert!(
                read_stat_cache(&mut &bytes[..cut], cut as u64).is_err(),
                "cut at {}",
                cut
            );
        }
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_stat_cache(&mut &huge[..], huge.len() as u64).is_err());
        assert!(read_stat_cache(&mut &b"{\"a\": 1}"[..], 8).is_err());
    }
}
