//! Content digests (`sha256:<64 hex>`) and a writer that hashes what passes through it.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A sha256 content digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }
    /// From a finished hasher.
    pub fn from_hasher(h: Sha256) -> Digest {
        Digest {
            hex: hex::encode(h.finalize()),
        }
    }
    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// A digest is written in documents as its `sha256:<hex>` string.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<str>>::deserialize(d)?;
        s.parse()
            .map_err(|e: BadDigest| serde::de::Error::custom(e.0))
    }
}

/// A string that is not a valid sha256 digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex characters>")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| BadDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(BadDigest(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

/// Passes writes through to `inner` while hashing and counting them.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }
    /// The digest and byte count of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (Digest::from_hasher(self.hasher), self.size, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// [`HashingWriter`] on threads of its own: writes are gathered into 1 MiB buffers that a
/// worker hashes and a second one passes to `inner`, so hashing overlaps with the
/// producer's work and with writing (a blob's hash is taken while the one before is
/// written).
pub struct ThreadedHashingWriter<W: Write + Send + 'static> {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Buffers the worker is done with, to fill again: fresh ones would cost a page fault
    /// per 4 KiB.
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
    worker: Option<std::thread::JoinHandle<io::Result<(Digest, u64, W)>>>,
}

const THREADED_BUFFER: usize = 1 << 20;

impl<W: Write + Send + 'static> ThreadedHashingWriter<W> {
    pub fn new(inner: W) -> Self {
        // A few buffers in flight at most: memory stays bounded.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        // At most the buffers in flight come back: this channel stays as small.
        let (spent_tx, spent) = std::sync::mpsc::channel::<Vec<u8>>();
        let worker = std::thread::spawn(move || {
            let (to_write, written) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
            let writer = std::thread::spawn(move || -> io::Result<W> {
                let mut inner = inner;
                for b in written {
                    inner.write_all(&b)?;
                    let _ = spent_tx.send(b);
                }
                Ok(inner)
            });
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            for b in rx {
                hasher.update(&b);
                size += b.len() as u64;
                // The writer stopped: its error comes out of the join.
                if to_write.send(b).is_err() {
                    break;
                }
            }
            drop(to_write);
            let inner = writer
                .join()
                .map_err(|_| io::Error::other("the writing thread panicked"))??;
            Ok((Digest::from_hasher(hasher), size, inner))
        });
        ThreadedHashingWriter {
            buf: Vec::with_capacity(THREADED_BUFFER),
            tx: Some(tx),
            spent,
            worker: Some(worker),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let next = self
            .spare()
            .unwrap_or_else(|| Vec::with_capacity(THREADED_BUFFER));
        let full = std::mem::replace(&mut self.buf, next);
        self.hand_over(full)
    }

    /// Queue `bytes` for the worker.
    fn hand_over(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(bytes).is_ok());
        if sent == Some(true) {
            Ok(())
        } else {
            // The worker stopped: its error comes out of `finish`.
            Err(self.join_err())
        }
    }

    fn join_err(&mut self) -> io::Error {
        self.tx = None;
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => e,
            _ => io::Error::other("the hashing thread stopped"),
        }
    }

    /// Hand `bytes` over whole, after everything written before: nothing is copied. The
    /// buffer comes back through [`ThreadedHashingWriter::spare`] once hashed and written.
    pub fn write_owned(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        self.hand_over(bytes)
    }

    /// A buffer the worker is done with, emptied, if one is back.
    pub fn spare(&mut self) -> Option<Vec<u8>> {
        self.spent.try_recv().ok().map(|mut b| {
            b.clear();
            b
        })
    }

    /// The digest and byte count of everything written, and the inner writer.
    pub fn finish(mut self) -> io::Result<(Digest, u64, W)> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        self.tx = None;
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            _ => Err(io::Error::other("the hashing thread panicked")),
        }
    }
}

impl<W: Write + Send + 'static> Write for ThreadedHashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let n = (THREADED_BUFFER - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == THREADED_BUFFER {
                self.send()?;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes reads through from `inner` while hashing and counting them.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }
    /// Read the rest of the stream, then return the digest and byte count of all of it.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_hasher(self.hasher), self.size))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threaded_hasher_agrees_with_the_inline_one() {
        let data: Vec<u8> = (0..(3 * THREADED_BUFFER + 777))
            .map(|i| (i % 253) as u8)
            .collect();
        let mut t = ThreadedHashingWriter::new(Vec::new());
        for piece in data.chunks(10_007) {
            t.write_all(piece).unwrap();
        }
        let (d, n, back) = t.finish().unwrap();
        assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
        assert_eq!(back, data);
    }

    #[test]
    fn buffers_handed_over_whole_keep_their_place_among_written_bytes() {
        let data: Vec<u8> = (0..(2 * THREADED_BUFFER + 12_345))
            .map(|i| (i % 241) as u8)
            .collect();
        let mut t = ThreadedHashingWriter::new(Vec::new());
        let (a, rest) = data.split_at(1000);
        let (b, c) = rest.split_at(THREADED_BUFFER + 5);
        t.write_all(a).unwrap();
        t.write_owned(b.to_vec()).unwrap();
        t.write_all(c).unwrap();
        let (d, n, back) = t.finish().unwrap();
        assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
        assert_eq!(back, data);
    }

    #[test]
    fn a_failing_inner_writer_fails_the_threaded_hasher_without_hanging() {
        /// Takes 2 MiB, then fails like a full disk.
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 + buf.len() > 2 << 20 {
                    return Err(io::Error::other("no space left"));
                }
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut t = ThreadedHashingWriter::new(Full(0));
        let piece = vec![1u8; 1 << 16];
        let mut failed = false;
        for _ in 0..(64 << 20) / piece.len() {
            if t.write_all(&piece).is_err() {
                failed = true;
                break;
            }
        }
        let err = if failed {
            "a write failed".to_string()
        } else {
            t.finish().err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(!err.is_empty(), "64 MiB into a 2 MiB disk must fail");
    }

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!("md5:00".parse::<Digest>().is_err());
    }
}
