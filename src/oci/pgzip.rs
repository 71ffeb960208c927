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

use std::io::{self, Write};

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

/// A gzip writer that compresses with up to `jobs` threads, reusing chunks from `reuse`.
pub struct ParallelGzWriter<'r, W: Write> {
    inner: W,
    level: u32,
    jobs: usize,
    crc: Crc,
    /// Uncompressed bytes so far (the gzip trailer's size).
    plain: u64,
    /// Bytes written to `inner` so far.
    written: u64,
    /// Closed chunks not yet compressed.
    pending: Vec<Vec<u8>>,
    /// The chunk being filled, and where it starts in the uncompressed stream.
    current: Vec<u8>,
    start: u64,
    tar: TarTracker,
    reuse: Option<&'r dyn ChunkReuse>,
    table: Vec<ChunkInfo>,
    reused: usize,
    /// Chunk buffers done with, to fill again (fresh ones cost a page fault per 4 KiB).
    spare: Vec<Vec<u8>>,
    /// Where compressed chunks go to be hashed in order, whole, for the sha256 of the
    /// uncompressed stream (a layer's diff_id) without another copy of its bytes.
    plain_hash: Option<ThreadedHashingWriter<io::Sink>>,
}

impl<'r, W: Write> ParallelGzWriter<'r, W> {
    pub fn new(
        mut inner: W,
        level: u32,
        jobs: usize,
        reuse: Option<&'r dyn ChunkReuse>,
    ) -> io::Result<Self> {
        // No name, no mtime, no extra flags, OS "unknown": the same bytes everywhere.
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        Ok(ParallelGzWriter {
            inner,
            level: level.min(9),
            jobs: jobs.max(1),
            crc: Crc::new(),
            plain: 0,
            written: 10,
            pending: Vec::new(),
            current: Vec::with_capacity(MIN_CHUNK * 2),
            start: 0,
            tar: TarTracker { next_header: 0 },
            reuse,
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
        self.pending
            .push(std::mem::replace(&mut self.current, next));
        self.start = at;
        if self.pending.len() >= self.jobs {
            let chunks = std::mem::take(&mut self.pending);
            self.compress(chunks)?;
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

    /// Compress (or reuse) `chunks` in parallel and write them out in order.
    fn compress(&mut self, chunks: Vec<Vec<u8>>) -> io::Result<()> {
        let level = self.level;
        let reuse = self.reuse;
        type Done = (String, u32, u64, Vec<u8>, bool);
        let outputs: Vec<io::Result<Done>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let key = chunk_key(c);
                        let len = c.len() as u64;
                        if let Some((z, crc)) = reuse.and_then(|r| r.compressed(&key, level)) {
                            return Ok((key, crc, len, z, true));
                        }
                        let mut crc = Crc::new();
                        crc.update(c);
                        deflate(c, level).map(|z| (key, crc.finalize(), len, z, false))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("compression thread panicked")))
                })
                .collect()
        });
        for o in outputs {
            let (key, crc, len, z, reused) = o?;
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
        }
        // Enough spares for a batch and for what the hasher holds: a chunk buffer is then
        // never allocated anew once the first few are.
        let keep = self.jobs + HASHER_IN_FLIGHT;
        for mut c in chunks {
            match self.plain_hash.as_mut() {
                Some(h) => h.write_owned(c)?,
                None if self.spare.len() < keep => {
                    c.clear();
                    self.spare.push(c);
                }
                None => {}
            }
        }
        if let Some(h) = self.plain_hash.as_mut() {
            while let Some(back) = h.spare() {
                if self.spare.len() < keep {
                    self.spare.push(back);
                }
            }
        }
        Ok(())
    }

    /// Write everything out (an empty final block, then the gzip trailer); returns the
    /// inner writer, the chunk table, how many chunks were reused, and the sha256 of the
    /// uncompressed stream when [`ParallelGzWriter::hashing_plain`] asked for it.
    pub fn finish(mut self) -> io::Result<GzFinished<W>> {
        let mut chunks = std::mem::take(&mut self.pending);
        if !self.current.is_empty() {
            chunks.push(std::mem::take(&mut self.current));
        }
        while !chunks.is_empty() {
            let rest = chunks.split_off(chunks.len().min(self.jobs));
            self.compress(std::mem::replace(&mut chunks, rest))?;
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

/// What [`ParallelGzWriter::finish`] hands back.
pub struct GzFinished<W> {
    pub inner: W,
    pub table: Vec<ChunkInfo>,
    /// How many chunks came from a [`ChunkReuse`].
    pub reused: usize,
    /// The sha256 of the uncompressed stream, when it was asked for.
    pub plain_digest: Option<Digest>,
}

impl<W: Write> Write for ParallelGzWriter<'_, W> {
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
pub fn deflate(data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    // Already-compressed data (archives, media, random bytes) only costs time to deflate:
    // when a quick sample does not shrink, store the chunk. The choice depends only on the
    // chunk's bytes, so the output stays reproducible.
    let level = if level > 0 && incompressible(data)? {
        0
    } else {
        level
    };
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        let room_left = out.capacity() - out.len() > 0;
        match status {
            Status::StreamEnd => break,
            _ if all_in && room_left => break,
            _ => {}
        }
    }
    Ok(out)
}

/// Bytes sampled to decide whether a chunk is worth compressing.
const SAMPLE: usize = 64 << 10;

fn incompressible(data: &[u8]) -> io::Result<bool> {
    if data.len() < SAMPLE {
        return Ok(false);
    }
    let sample = &data[..SAMPLE];
    let mut c = Compress::new(Compression::new(1), false);
    let mut out = Vec::with_capacity(SAMPLE + 1024);
    c.compress_vec(sample, &mut out, FlushCompress::Finish)
        .map_err(io::Error::other)?;
    // Not even 2% smaller at the fastest level: not worth deflating.
    Ok(c.total_in() as usize == SAMPLE && out.len() * 100 >= SAMPLE * 98)
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
        let mut w = ParallelGzWriter::new(Vec::new(), 6, jobs, reuse)
            .unwrap()
            .hashing_plain();
        for piece in data.chunks(7777) {
            w.write_all(piece).unwrap();
        }
        let GzFinished {
            inner: gz,
            table,
            reused,
            plain_digest,
        } = w.finish().unwrap();
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
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..n {
            let mut body: Vec<u8> = (0..3000).map(|k| ((i * 31 + k * 7) % 251) as u8).collect();
            if edited == Some(i) {
                body.extend_from_slice(b"an edit that changes the size");
            }
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("dir/file-{}", i), &body[..])
                .unwrap();
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
}
