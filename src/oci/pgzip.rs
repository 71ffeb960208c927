//! Parallel gzip, pigz-style: the input is cut into fixed 1 MiB chunks, each compressed on its
//! own thread as raw deflate primed with the previous chunk's last 32 KiB (so the ratio stays
//! close to a single stream), ended with a sync flush, and the pieces are joined into one gzip
//! member. The bytes depend only on the chunk size and level, never on the number of threads,
//! so layer digests stay reproducible on any machine.

use std::io::{self, Write};

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

const CHUNK: usize = 1 << 20;
const WINDOW: usize = 32 << 10;

/// A gzip writer that compresses with up to `jobs` threads.
pub struct ParallelGzWriter<W: Write> {
    inner: W,
    level: u32,
    jobs: usize,
    crc: Crc,
    /// Full chunks not yet compressed; the last one may be the final chunk.
    pending: Vec<Vec<u8>>,
    current: Vec<u8>,
    /// The dictionary for the next chunk to be compressed.
    window: Vec<u8>,
    header_written: bool,
}

impl<W: Write> ParallelGzWriter<W> {
    pub fn new(inner: W, level: u32, jobs: usize) -> Self {
        ParallelGzWriter {
            inner,
            level: level.min(9),
            jobs: jobs.max(1),
            crc: Crc::new(),
            pending: Vec::new(),
            current: Vec::with_capacity(CHUNK),
            window: Vec::new(),
            header_written: false,
        }
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.header_written {
            // No name, no mtime, no extra flags, OS "unknown": the same bytes everywhere.
            self.inner
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Compress `chunks` in parallel; only the very last chunk of the stream is `last`.
    fn flush_chunks(&mut self, chunks: Vec<Vec<u8>>, last_is_final: bool) -> io::Result<()> {
        self.header()?;
        let n = chunks.len();
        let mut dicts = Vec::with_capacity(n);
        let mut prev = std::mem::take(&mut self.window);
        for c in &chunks {
            dicts.push(prev);
            prev = c[c.len().saturating_sub(WINDOW)..].to_vec();
        }
        self.window = prev;
        let level = self.level;
        let mut outputs: Vec<io::Result<Vec<u8>>> = (0..n).map(|_| Ok(Vec::new())).collect();
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for (i, (c, d)) in chunks.iter().zip(dicts.iter()).enumerate() {
                let final_chunk = last_is_final && i + 1 == n;
                handles.push(s.spawn(move || deflate(c, d, level, final_chunk)));
            }
            for (i, h) in handles.into_iter().enumerate() {
                outputs[i] = h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("compression thread panicked")));
            }
        });
        for o in outputs {
            self.inner.write_all(&o?)?;
        }
        Ok(())
    }

    /// Write everything out (with the gzip trailer) and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let mut chunks = std::mem::take(&mut self.pending);
        chunks.push(std::mem::take(&mut self.current));
        for group_start in (0..chunks.len()).step_by(self.jobs) {
            let end = (group_start + self.jobs).min(chunks.len());
            let group: Vec<Vec<u8>> = chunks[group_start..end].to_vec();
            self.flush_chunks(group, end == chunks.len())?;
        }
        let crc = self.crc.sum();
        let size = self.crc.amount();
        self.inner.write_all(&crc.to_le_bytes())?;
        self.inner.write_all(&size.to_le_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelGzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.crc.update(buf);
        let mut rest = buf;
        while !rest.is_empty() {
            let room = CHUNK - self.current.len();
            let take = room.min(rest.len());
            self.current.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.current.len() == CHUNK {
                self.pending.push(std::mem::replace(
                    &mut self.current,
                    Vec::with_capacity(CHUNK),
                ));
                // Keep one full chunk back: it may turn out to be the last one.
                if self.pending.len() > self.jobs {
                    let group: Vec<Vec<u8>> = self.pending.drain(..self.jobs).collect();
                    self.flush_chunks(group, false)?;
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Raw deflate of one chunk, primed with `dict`, ended by a sync flush (or the final block).
fn deflate(data: &[u8], dict: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    // Already-compressed data (archives, media, random bytes) only costs time to deflate:
    // when a quick sample does not shrink, store the chunk. The choice depends only on the
    // chunk's bytes, so the output stays reproducible.
    let level = if level > 0 && incompressible(data)? {
        0
    } else {
        level
    };
    let mut c = Compress::new(Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        let room_left = out.capacity() - out.len() > 0;
        match status {
            Status::StreamEnd => break,
            _ if all_in && room_left && !last => break,
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
    use std::io::Read;

    fn roundtrip(data: &[u8], jobs: usize) -> Vec<u8> {
        let mut w = ParallelGzWriter::new(Vec::new(), 6, jobs);
        for piece in data.chunks(7777) {
            w.write_all(piece).unwrap();
        }
        let gz = w.finish().unwrap();
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        gz
    }

    #[test]
    fn decodes_and_is_independent_of_thread_count() {
        let mut data = Vec::new();
        for i in 0..(3 * CHUNK + 12345) {
            data.push(((i * 7919) % 251) as u8 ^ (i / 1000) as u8);
        }
        let one = roundtrip(&data, 1);
        let four = roundtrip(&data, 4);
        assert_eq!(one, four);
        roundtrip(b"", 2);
        // Incompressible chunks are stored, and still round-trip identically.
        let mut noise = Vec::new();
        let mut x: u64 = 0x2545f4914f6cdd1d;
        for _ in 0..(2 * CHUNK + 999) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.push(x as u8);
        }
        assert_eq!(roundtrip(&noise, 1), roundtrip(&noise, 3));
        roundtrip(&data[..CHUNK], 3);
        roundtrip(&data[..2 * CHUNK], 2);
    }
}
