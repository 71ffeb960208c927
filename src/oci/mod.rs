//! OCI building blocks, free of build logic: digests, the blob store, the tar format, layer
//! trees and layer writing, safe unpacking, image documents and layouts.

pub mod at;
pub mod blobs;
pub mod diff;
pub mod digest;
pub mod document;
pub mod image;
pub mod layer;
pub mod pgzip;
pub mod platform;
pub mod root;
pub mod segments;
pub mod squash;
pub mod tar;
pub mod tree;
pub mod unpack;

pub use blobs::BlobStore;
pub use digest::Digest;
pub use layer::{Compression, Layer};

/// A count of things and of their bytes, added to from any thread (files a layer read,
/// layers a snapshotter unpacked).
#[derive(Debug, Default)]
pub struct Tally {
    count: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl Tally {
    pub fn add(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// How many, and their bytes, so far.
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.count.load(Relaxed), self.bytes.load(Relaxed))
    }
}
