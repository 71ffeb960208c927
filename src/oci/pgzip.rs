//! Parallel gzip in independent chunks, cut where the content says, so that a layer whose
//! content barely changed costs only its changed chunks.
//!
//! - The tar stream is cut into chunks on entry boundaries: before a header whose name hashes
//!   to a multiple of [`CUT_ONE_IN`], once the chunk holds at least [`MIN_CHUNK`] bytes;
//!   and at [`MAX_CHUNK`] bytes inside big files. A cut depends only on the bytes since the
//!   last cut, so an edit moves no boundary beyond the next one.
//! - Each chunk is raw deflate on its own (no dictionary from the chunk before), ended with a
//!   sync flush; the gzip member is the header, the chunks in order, an empty final block
//!   and the CRC and size of the whole. Any gzip reader reads it as one stream.
//! - A chunk whose uncompressed bytes an earlier layer held is not compressed again: its
//!   compressed bytes (and CRC) come from a [`ChunkReuse`], keyed by the BLAKE3 hash of the
//!   uncompressed chunk and the level, and are the same bytes a compression would give.
//!   BLAKE3, not sha256: the key is internal, every byte of a rewritten layer is keyed, and
//!   BLAKE3 is several times faster (the layer's diff_id and digest stay sha256).
//!
//! So the output depends only on the content and the level, never on the number of threads
//! or on what a cache held: a cold build and an edit rebuild of the same content give the
//! same blob.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{mpsc, Arc, Mutex};

use crc32fast::Hasher as Crc;
use flate2::{Compress, Compression, FlushCompress, Status};
use sha2::{Digest as _, Sha256};

use super::digest::{Digest, ThreadedHashingWriter};

/// A chunk is cut at an entry boundary only once it holds this much.
pub const MIN_CHUNK: usize = 512 << 10;
/// A chunk never holds more than this (big files are cut inside).
pub const MAX_CHUNK: usize = 4 << 20;
/// One entry boundary in this many (by the hash of the header's name) may end a chunk.
pub const CUT_ONE_IN: u64 = 8;
/// About how many chunks the diff_id's hasher holds at once (queued, being hashed, on
/// their way back).
const HASHER_IN_FLIGHT: usize = 8;

/// Where compressed chunks of earlier layers can be found.
pub trait ChunkReuse: Sync {
    /// The compressed form (raw deflate ending in a sync flush, at `level`) of the chunk
    /// whose uncompressed bytes have the key `key`, with the CRC-32 of those bytes, if it
    /// is known.
    fn compressed(&self, key: &str, level: u32) -> Option<(Vec<u8>, u32)>;
}

/// The key of a chunk: the BLAKE3 hash (hex) of its uncompressed bytes.
pub fn chunk_key(uncompressed: &[u8]) -> String {
    blake3::hash(uncompressed).to_hex().to_string()
}

/// One chunk of a written gzip member: the key and CRC-32 of its uncompressed bytes, and
/// where its compressed bytes sit in the member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkInfo {
    pub key: String,
    pub crc: u32,
    pub offset: u64,
    pub size: u64,
}

/// Follows tar headers through the stream, to know where entries begin.
struct TarTracker {
    /// Where the next header starts (absolute offset); `u64::MAX` once the stream stops
    /// looking like a tar (cuts then fall at `MAX_CHUNK` only).
    next_header: u64,
}

impl TarTracker {
    /// Where the header at `at` says the next one starts.
    fn after(header: &[u8], at: u64) -> u64 {
        use super::tar::{tar_checksum_ok, tar_number};
        if !tar_checksum_ok(header) {
            return u64::MAX;
        }
        let size = tar_number(&header[124..136]).unwrap_or(0);
        at.saturating_add(512)
            .saturating_add(size.div_ceil(512).saturating_mul(512))
    }
}

/// Whether a chunk may end before the header `header` (by its name field).
fn cuts_before(header: &[u8]) -> bool {
    let h = Sha256::digest(&header[..100]);
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) % CUT_ONE_IN == 0
}

/// A compressed chunk: its key, the CRC-32 and length of its uncompressed bytes, its
/// compressed bytes, and whether they were reused.
type Compressed = (String, u32, u64, Vec<u8>, bool);

/// What comes back from a compressing thread: the chunk's place in the stream, its
/// compression, and its uncompressed bytes (to be hashed, then filled again).
type Returned = (u64, io::Result<Compressed>, Vec<u8>);

/// A gzip writer that compresses on `jobs` threads of a scope, reusing chunks from `reuse`.
/// Chunks are compressed beside the writing of the next ones (at most
/// [`IN_FLIGHT_PER_JOB`] per thread at a time) and written out in order.
pub struct ParallelGzWriter<W: Write> {
    inner: W,
    crc: Crc,
    /// Uncompressed bytes so far (the gzip trailer's size).
    plain: u64,
    /// Bytes written to `inner` so far.
    written: u64,
    /// The chunk being filled, and where it starts in the uncompressed stream.
    current: Vec<u8>,
    start: u64,
    tar: TarTracker,
    /// Where closed chunks go to be compressed (`None` once finished), numbered in order.
    to_compress: Option<mpsc::SyncSender<(u64, Vec<u8>)>>,
    compressed: mpsc::Receiver<Returned>,
    sent: u64,
    /// Chunks compressed out of order, waiting for the ones before them.
    early: BTreeMap<u64, (io::Result<Compressed>, Vec<u8>)>,
    next_out: u64,
    in_flight_limit: u64,
    table: Vec<ChunkInfo>,
    reused: usize,
    /// Chunk buffers done with, to fill again (fresh ones cost a page fault per 4 KiB).
    spare: Vec<Vec<u8>>,
    /// Where compressed chunks go to be hashed in order, whole, for the sha256 of the
    /// uncompressed stream (a layer's diff_id) without another copy of its bytes.
    plain_hash: Option<ThreadedHashingWriter<io::Sink>>,
}

/// Chunks queued or being compressed, per compressing thread.
const IN_FLIGHT_PER_JOB: u64 = 2;

impl<W: Write> ParallelGzWriter<W> {
    pub fn new<'s, 'e>(
        scope: &'s std::thread::Scope<'s, 'e>,
        mut inner: W,
        level: u32,
        jobs: usize,
        reuse: Option<&'s dyn ChunkReuse>,
    ) -> io::Result<Self> {
        // No name, no mtime, no extra flags, OS "unknown": the same bytes everywhere.
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        let level = level.min(9);
        let jobs = jobs.max(1);
        let in_flight_limit = jobs as u64 * IN_FLIGHT_PER_JOB;
        let (to_compress, queue) = mpsc::sync_channel::<(u64, Vec<u8>)>(in_flight_limit as usize);
        let (back, compressed) = mpsc::channel::<Returned>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..jobs {
            let queue = Arc::clone(&queue);
            let back = back.clone();
            scope.spawn(move || loop {
                // The lock is held only to take the next chunk; a poisoned one (a thread that
                // panicked) still hands chunks out.
                let next = match queue.lock() {
                    Ok(q) => q.recv(),
                    Err(poisoned) => poisoned.into_inner().recv(),
                };
                let Ok((seq, chunk)) = next else { return };
                let done = compress_chunk(&chunk, level, reuse);
                if back.send((seq, done, chunk)).is_err() {
                    return;
                }
            });
        }
        Ok(ParallelGzWriter {
            inner,
            crc: Crc::new(),
            plain: 0,
            written: 10,
            current: Vec::with_capacity(MIN_CHUNK * 2),
            start: 0,
            tar: TarTracker { next_header: 0 },
            to_compress: Some(to_compress),
            compressed,
            sent: 0,
            early: BTreeMap::new(),
            next_out: 0,
            in_flight_limit,
            table: Vec::new(),
            reused: 0,
            spare: Vec::new(),
            plain_hash: None,
        })
    }

    /// Also take the sha256 of the uncompressed stream; [`ParallelGzWriter::finish`] then
    /// returns it.
    pub fn hashing_plain(mut self) -> Self {
        self.plain_hash = Some(ThreadedHashingWriter::new(io::sink()));
        self
    }

    /// Close the current chunk at absolute offset `at`.
    fn cut(&mut self, at: u64) -> io::Result<()> {
        let cut = (at - self.start) as usize;
        let mut next = match self.spare.pop() {
            Some(b) => b,
            None => self
                .plain_hash
                .as_mut()
                .and_then(|h| h.spare())
                .unwrap_or_else(|| Vec::with_capacity(MIN_CHUNK * 2)),
        };
        next.extend_from_slice(&self.current[cut..]);
        self.current.truncate(cut);
        let chunk = std::mem::replace(&mut self.current, next);
        self.start = at;
        self.send(chunk)
    }

    /// Queue `chunk` for compression, first writing out what is done while too many are
    /// in flight.
    fn send(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        while self.sent - self.next_out >= self.in_flight_limit {
            self.write_next()?;
        }
        let queue = self
            .to_compress
            .as_ref()
            .ok_or_else(|| io::Error::other("internal: a chunk after the end"))?;
        queue
            .send((self.sent, chunk))
            .map_err(|_| io::Error::other("the compressing threads stopped"))?;
        self.sent += 1;
        // What is already done goes out now, without waiting.
        while let Ok((seq, done, chunk)) = self.compressed.try_recv() {
            self.early.insert(seq, (done, chunk));
        }
        while self.early.contains_key(&self.next_out) {
            self.write_next()?;
        }
        Ok(())
    }

    /// Wait for the next chunk in order and write it out.
    fn write_next(&mut self) -> io::Result<()> {
        let (done, chunk) = loop {
            if let Some(ready) = self.early.remove(&self.next_out) {
                break ready;
            }
            let (seq, done, chunk) = self
                .compressed
                .recv()
                .map_err(|_| io::Error::other("the compressing threads stopped"))?;
            self.early.insert(seq, (done, chunk));
        };
        self.next_out += 1;
        let (key, crc, len, z, reused) = done?;
        self.crc.combine(&Crc::new_with_initial_len(crc, len));
        self.plain += len;
        self.inner.write_all(&z)?;
        self.table.push(ChunkInfo {
            key,
            crc,
            offset: self.written,
            size: z.len() as u64,
        });
        self.written += z.len() as u64;
        self.reused += reused as usize;
        // Enough spares for what is in flight and what the hasher holds: a chunk buffer is
        // then never allocated anew once the first few are.
        let keep = self.in_flight_limit as usize + HASHER_IN_FLIGHT;
        match self.plain_hash.as_mut() {
            Some(h) => {
                h.write_owned(chunk)?;
                while let Some(back) = h.spare() {
                    if self.spare.len() < keep {
                        self.spare.push(back);
                    }
                }
            }
            None if self.spare.len() < keep => {
                let mut chunk = chunk;
                chunk.clear();
                self.spare.push(chunk);
            }
            None => {}
        }
        Ok(())
    }

    /// Make every cut the bytes received so far decide.
    fn cut_what_is_decided(&mut self) -> io::Result<()> {
        loop {
            let end = self.start + self.current.len() as u64;
            let header = self.tar.next_header;
            let max_at = self.start + MAX_CHUNK as u64;
            if max_at <= header && max_at <= end {
                self.cut(max_at)?;
                continue;
            }
            if header != u64::MAX && header.saturating_add(512) <= end {
                let off = (header - self.start) as usize;
                let h: [u8; 512] = self.current[off..off + 512]
                    .try_into()
                    .map_err(|_| io::Error::other("internal: a short tar header"))?;
                self.tar.next_header = TarTracker::after(&h, header);
                if off >= MIN_CHUNK && cuts_before(&h) {
                    self.cut(header)?;
                }
                continue;
            }
            return Ok(());
        }
    }

    /// Write everything out (an empty final block, then the gzip trailer); returns the
    /// inner writer, the chunk table, how many chunks were reused, and the sha256 of the
    /// uncompressed stream when [`ParallelGzWriter::hashing_plain`] asked for it.
    pub fn finish(mut self) -> io::Result<GzFinished<W>> {
        if !self.current.is_empty() {
            let last = std::mem::take(&mut self.current);
            self.send(last)?;
        }
        // The threads stop once the queue is empty.
        self.to_compress = None;
        while self.next_out < self.sent {
            self.write_next()?;
        }
        // The empty final block: BFINAL, fixed Huffman, end of block.
        self.inner.write_all(&[0x03, 0x00])?;
        self.inner
            .write_all(&self.crc.clone().finalize().to_le_bytes())?;
        // ISIZE: the uncompressed size modulo 2^32.
        self.inner.write_all(&(self.plain as u32).to_le_bytes())?;
        let plain_digest = match self.plain_hash.take() {
            Some(h) => Some(h.finish()?.0),
            None => None,
        };
        Ok(GzFinished {
            inner: self.inner,
            table: self.table,
            reused: self.reused,
            plain_digest,
        })
    }
}

/// Compress `chunk` at `level`, or take its compressed bytes from `reuse`.
fn compress_chunk(
    chunk: &[u8],
    level: u32,
    reuse: Option<&dyn ChunkReuse>,
) -> io::Result<Compressed> {
    let key = chunk_key(chunk);
    let len = chunk.len() as u64;
    if let Some((z, crc)) = reuse.and_then(|r| r.compressed(&key, level)) {
        return Ok((key, crc, len, z, true));
    }
    let mut crc = Crc::new();
    crc.update(chunk);
    deflate(chunk, level).map(|z| (key, crc.finalize(), len, z, false))
}

/// What [`ParallelGzWriter::finish`] hands back.
pub struct GzFinished<W> {
    pub inner: W,
    pub table: Vec<ChunkInfo>,
    /// How many chunks came from a [`ChunkReuse`].
    pub reused: usize,
    /// The sha256 of the uncompressed stream, when it was asked for.
    pub plain_digest: Option<Digest>,
}

impl<W: Write> Write for ParallelGzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.current.extend_from_slice(buf);
        self.cut_what_is_decided()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One chunk as raw deflate ending in a sync flush (never a final block).
///
/// Already-compressed bytes (archives, media, random data) only cost time to deflate, and
/// a package tree mixes them with text in every chunk: so the chunk's file contents are
/// looked at window by window ([`stored_ranges`]), and a window that looks incompressible
/// is written as stored blocks while the rest is deflated at `level`, in one stream whose
/// history runs across them. The choice depends only on the chunk's bytes,
/// so the output stays reproducible (and a reused chunk is the bytes a compression gives).
pub fn deflate(data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let stored = if level > 0 {
        stored_ranges(data)
    } else {
        Vec::new()
    };
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    let mut at = 0;
    for range in stored {
        if range.start > at {
            feed(&mut c, &data[at..range.start], &mut out)?;
        }
        // Every block so far ends byte-aligned (a sync flush), so stored blocks of our own
        // follow; the compressor then learns their bytes as history, as a reader has them.
        let bytes = &data[range.clone()];
        write_stored(bytes, &mut out);
        c.set_dictionary(&bytes[bytes.len().saturating_sub(HISTORY)..])
            .map_err(io::Error::other)?;
        at = range.end;
    }
    if at < data.len() || out.is_empty() {
        feed(&mut c, &data[at..], &mut out)?;
    }
    Ok(out)
}

/// How far back deflate refers.
const HISTORY: usize = 32 << 10;

/// `bytes` as non-final stored blocks, starting on a byte boundary.
fn write_stored(bytes: &[u8], out: &mut Vec<u8>) {
    for block in bytes.chunks(u16::MAX as usize) {
        let len = block.len() as u16;
        // BFINAL 0, BTYPE 00, then padding to the byte: one zero byte.
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// Compress all of `input` and sync-flush it, growing `out` as needed.
fn feed(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let first = c.total_in();
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let consumed = (c.total_in() - first) as usize;
        let status = c
            .compress_vec(&input[consumed..], out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let all_in = (c.total_in() - first) as usize == input.len();
        let room_left = out.capacity() - out.len() > 0;
        match status {
            Status::StreamEnd => return Ok(()),
            _ if all_in && room_left => return Ok(()),
            _ => {}
        }
    }
}

/// Contents are judged in windows of this many bytes (a big file's parts may differ).
const WINDOW: usize = 64 << 10;
/// A window is judged on its first this many bytes.
const SAMPLE: usize = 4 << 10;
/// A window smaller than this is deflated whatever it holds: a switch costs a block.
const MIN_STORED: usize = 2 << 10;

/// The parts of a chunk to store rather than deflate: windows of file contents whose
/// bytes look uniformly spread ([`looks_incompressible`]), merged where they touch. A
/// chunk that starts with a tar header is walked header by header (within its own bytes
/// only, so the answer is a function of them), and only regular files' contents are
/// judged; from where the walk stops (a chunk cut inside a big file, an end of archive),
/// the rest is judged as one body.
fn stored_ranges(data: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut bodies = Vec::new();
    let mut at: usize = 0;
    while at.saturating_add(512) <= data.len() {
        let header = &data[at..at + 512];
        let next = TarTracker::after(header, at as u64);
        if next == u64::MAX {
            break;
        }
        if matches!(header[156], b'0' | 0 | b'7') {
            let size = super::tar::tar_number(&header[124..136]).unwrap_or(0);
            let end = (at + 512).saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
            bodies.push(at + 512..end.min(data.len()));
        }
        at = usize::try_from(next).unwrap_or(usize::MAX);
    }
    if at < data.len() && !data[at..].iter().all(|b| *b == 0) {
        bodies.push(at..data.len());
    }
    let mut stored: Vec<std::ops::Range<usize>> = Vec::new();
    for body in bodies {
        let mut w = body.start;
        while w < body.end {
            let end = (w + WINDOW).min(body.end);
            if end - w >= MIN_STORED && looks_incompressible(&data[w..end.min(w + SAMPLE)]) {
                match stored.last_mut() {
                    Some(last) if last.end == w => last.end = end,
                    _ => stored.push(w..end),
                }
            }
            w = end;
        }
    }
    stored
}

/// Whether `sample`'s bytes are spread evenly over all 256 values, as in compressed or
/// random data: Pearson's chi-squared against the uniform spread, in integers (the same
/// answer on every machine). Uniform bytes give about 255 (the degrees of freedom, give or
/// take 23); text and code give thousands.
fn looks_incompressible(sample: &[u8]) -> bool {
    let mut counts = [0u64; 256];
    for b in sample {
        counts[*b as usize] += 1;
    }
    let n = sample.len() as u64;
    // chi2 = sum((c - n/256)^2 / (n/256)) = sum((256c - n)^2) / (256 n)
    let spread: u64 = counts.iter().map(|c| (256 * c).abs_diff(n).pow(2)).sum();
    spread < 400 * 256 * n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Read;
    use std::sync::Mutex;

    fn gzip(
        data: &[u8],
        jobs: usize,
        reuse: Option<&dyn ChunkReuse>,
    ) -> (Vec<u8>, Vec<ChunkInfo>, usize) {
        let GzFinished {
            inner: gz,
            table,
            reused,
            plain_digest,
        } = std::thread::scope(|scope| {
            let mut w = ParallelGzWriter::new(scope, Vec::new(), 6, jobs, reuse)
                .unwrap()
                .hashing_plain();
            for piece in data.chunks(7777) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap()
        });
        // Chunks hashed whole once compressed, reused ones too, give the stream's sha256.
        assert_eq!(plain_digest, Some(Digest::of(data)));
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        // Every chunk is where the table says.
        for c in &table {
            assert!(c.offset + c.size <= gz.len() as u64);
        }
        (gz, table, reused)
    }

    /// A tar of `n` files with pseudo-random content, one of them edited.
    fn tar_of(n: usize, edited: Option<usize>) -> Vec<u8> {
        tar_with((0..n).map(|i| {
            let mut body: Vec<u8> = (0..3000).map(|k| ((i * 31 + k * 7) % 251) as u8).collect();
            if edited == Some(i) {
                body.extend_from_slice(b"an edit that changes the size");
            }
            (format!("dir/file-{}", i), body)
        }))
    }

    /// A tar of regular files, by name and content.
    fn tar_with(files: impl Iterator<Item = (String, Vec<u8>)>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &body[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Chunks remembered from earlier outputs.
    #[derive(Default)]
    struct Remembered(Mutex<HashMap<String, (Vec<u8>, u32)>>);

    impl Remembered {
        fn learn(&self, gz: &[u8], table: &[ChunkInfo]) {
            let mut m = self.0.lock().unwrap();
            for c in table {
                m.insert(
                    c.key.clone(),
                    (
                        gz[c.offset as usize..(c.offset + c.size) as usize].to_vec(),
                        c.crc,
                    ),
                );
            }
        }
    }

    impl ChunkReuse for Remembered {
        fn compressed(&self, key: &str, _level: u32) -> Option<(Vec<u8>, u32)> {
            self.0.lock().unwrap().get(key).cloned()
        }
    }

    #[test]
    fn decodes_and_is_independent_of_thread_count() {
        let data = tar_of(2000, None);
        let (one, t1, _) = gzip(&data, 1, None);
        let (four, t4, _) = gzip(&data, 4, None);
        assert_eq!(one, four);
        assert_eq!(t1, t4);
        assert!(t1.len() > 3, "{} chunks", t1.len());
        gzip(b"", 2, None);
        // Not a tar, incompressible: cut at MAX_CHUNK, stored, still round-trips.
        let mut noise = Vec::new();
        let mut x: u64 = 0x2545f4914f6cdd1d;
        for _ in 0..(2 * MAX_CHUNK + 999) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.push(x as u8);
        }
        let (a, t, _) = gzip(&noise, 1, None);
        assert_eq!(t.len(), 3);
        assert_eq!(a, gzip(&noise, 3, None).0);
    }

    #[test]
    fn an_edit_recompresses_one_chunk_and_gives_the_cold_bytes() {
        let before = tar_of(3000, None);
        let after = tar_of(3000, Some(1700));
        let seen = Remembered::default();
        let (gz_before, table_before, _) = gzip(&before, 2, None);
        seen.learn(&gz_before, &table_before);
        let (warm, table, reused) = gzip(&after, 2, Some(&seen));
        let (cold, _, _) = gzip(&after, 2, None);
        assert_eq!(
            warm, cold,
            "a reused chunk is the bytes a compression gives"
        );
        assert_eq!(
            table.len() - reused,
            1,
            "one chunk of {} compressed again",
            table.len()
        );
    }

    /// xorshift bytes: incompressible, and the same on every run.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn incompressible_file_contents_are_stored_and_text_beside_them_deflated() {
        // A package tree's mix: every third file random, the others text.
        let bodies: Vec<(String, Vec<u8>)> = (0..600)
            .map(|i| {
                let body = if i % 3 == 2 {
                    noise(7000, i as u64)
                } else {
                    format!("line {} of a text file that repeats itself\n", i % 7)
                        .repeat(160)
                        .into_bytes()
                };
                (format!("pkg/f{}", i), body)
            })
            .collect();
        let random: usize = bodies.iter().skip(2).step_by(3).map(|(_, b)| b.len()).sum();
        let text: usize = bodies.iter().map(|(_, b)| b.len()).sum::<usize>() - random;
        let data = tar_with(bodies.into_iter());
        let (gz, table, _) = gzip(&data, 2, None);
        assert_eq!(gz, gzip(&data, 1, None).0);
        // Stored: the random bytes plus a few bytes a block; the text shrinks to little.
        assert!(
            gz.len() < random + text / 10,
            "{} bytes from {} random and {} text",
            gz.len(),
            random,
            text
        );
        assert!(gz.len() > random);
        assert!(table.len() > 1, "more than one chunk");
    }

    #[test]
    fn uniform_bytes_look_incompressible_and_text_and_code_do_not() {
        assert!(looks_incompressible(&noise(4096, 7)));
        assert!(looks_incompressible(&noise(2048, 9)));
        let text = b"fn main() { let greeting = \"hello\"; }\n".repeat(200);
        assert!(!looks_incompressible(&text[..4096]));
        let counting: Vec<u8> = (0..4096u32).map(|i| (i % 64) as u8).collect();
        assert!(!looks_incompressible(&counting));
        // Even bytes, but only half the values: base64-like text, which deflate shrinks.
        let half: Vec<u8> = noise(4096, 3).iter().map(|b| b & 0x7f).collect();
        assert!(!looks_incompressible(&half));
    }
}
