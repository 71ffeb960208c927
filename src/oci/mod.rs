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
