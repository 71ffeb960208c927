//! Writing a step's layer: the tar from a tree (COPY, ADD, WORKDIR) or a diff directory
//! (RUN), compressed reusing the chunks and segments of earlier layers, scanned for the SBOM
//! as it streams, and, where the next step will read it, unpacked into its snapshot at the
//! same time. Also `--force-compression`'s conversion of inherited layers.

use std::io::Write;
use std::path::Path;

use super::cx::Ctx;
use super::BuildError;
use crate::oci::image::{ImageState, LayerRef};
use crate::oci::layer::{Compression, LayerOptions};
use crate::oci::unpack;
use crate::plan::Op;
use crate::progress::Reporter;
use crate::store::{Bucket, Store, StoreError};
use crate::worker::snapshots::{next_chain, RootView};

/// `layers`, each compressed as `compression` says: a layer compressed otherwise (a base
/// image's) is decompressed and compressed again, its diff_id checked. A conversion is
/// remembered by the source digest and the compression, so a rebuild does not repeat it.
pub(super) fn force_compression(
    store: &Store,
    layers: &[LayerRef],
    compression: Compression,
    reporter: &dyn Reporter,
) -> Result<Vec<LayerRef>, BuildError> {
    let memo = store.memo(Bucket::Converted);
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        if crate::oci::layer::compressed_as(&l.media_type, compression) {
            out.push(l.clone());
            continue;
        }
        let memo_key = format!("{}-{}", l.digest.hex(), compression.key());
        let remembered = memo
            .get(&memo_key)
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| LayerRef::from_json(&v))
            .filter(|c| c.diff_id == l.diff_id && store.blobs.available(&c.digest));
        let converted = match remembered {
            Some(c) => c,
            None => {
                let blob = store.blobs.ensure(&l.digest).map_err(StoreError::from)?;
                let c = crate::oci::layer::recompress(&store.blobs, l, &blob, compression)
                    .map_err(|e| BuildError::Other(e.to_string()))?;
                reporter.log(
                    0,
                    &format!(
                        "layer {} ({}) compressed again as {}: {}",
                        l.digest,
                        l.media_type,
                        compression.media_type(),
                        c.digest
                    ),
                );
                memo.put(&memo_key, &crate::oci::image::canonical_json(&c.to_json()));
                c
            }
        };
        out.push(converted);
    }
    Ok(out)
}

/// `--squash`: the layers of `state` after its base's (`base`: the base's layer and history
/// counts) become one, compressed as `compression` says. Remembered by the layers it is made
/// of, so a rebuild that made the same layers squashes nothing again.
pub(super) fn squash(
    store: &Store,
    state: &mut ImageState,
    base: (usize, usize),
    compression: Compression,
    created: &str,
) -> Result<(), BuildError> {
    let new = state.layers.get(base.0..).unwrap_or_default();
    if new.len() < 2 {
        return Ok(());
    }
    let sources: Vec<String> = new.iter().map(|l| l.digest.to_string()).collect();
    let memo = store.memo(Bucket::Converted);
    let memo_key = format!(
        "squash-{}-{}",
        crate::oci::digest::Digest::of(sources.join(",").as_bytes()).hex(),
        compression.key()
    );
    let remembered = memo
        .get(&memo_key)
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| LayerRef::from_json(&v))
        .filter(|c| store.blobs.available(&c.digest));
    let squashed = match remembered {
        Some(c) => c,
        None => {
            let blobs = new
                .iter()
                .map(|l| store.blobs.ensure(&l.digest))
                .collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)?;
            let paths: Vec<&std::path::Path> = blobs.iter().map(|p| p.as_path()).collect();
            let opts = crate::oci::layer::LayerOptions {
                compression,
                epoch: None,
                reuse: None,
                segments: None,
            };
            let layer = crate::oci::layer::write_layer_from(
                &store.blobs,
                crate::oci::layer::LayerSource::Squash(&paths),
                opts,
                None,
            )
            .map_err(|e| BuildError::Other(format!("--squash: {}", e)))?;
            let c: LayerRef = layer.into();
            memo.put(&memo_key, &crate::oci::image::canonical_json(&c.to_json()));
            c
        }
    };
    let created_by = format!("builder build --squash: {} layers in one", new.len());
    state.squash_since(base, squashed, created, &created_by);
    Ok(())
}

impl Ctx<'_, '_> {
    /// Write a layer described as a tree. The stage's view catches up lazily, only when a
    /// later step needs the filesystem.
    pub fn commit_tree(
        &mut self,
        op: &Op,
        tree: &crate::oci::tree::LayerTree,
    ) -> Result<LayerRef, BuildError> {
        let mut ahead = self.snapshot_ahead.take().and_then(|(below, need)| {
            let staged = self.snaps.stage(need).ok()?;
            let unpacker =
                unpack::StreamUnpacker::start(&op.origin.text, &staged.dir, staged.options).ok()?;
            // A tuple drops its fields in order: on failure the unpacking thread is joined
            // before its directory is removed.
            Some((below, unpacker, staged))
        });
        let layer = self.write_step_layer(
            op,
            crate::oci::layer::LayerSource::Tree(tree),
            ahead.as_mut().map(|(_, u, _)| u as &mut dyn Write),
        )?;
        // The snapshot is a shortcut: if it could not be made, the blob is unpacked later.
        if let Some((below, unpacker, staged)) = ahead {
            if unpacker.finish().is_ok() {
                let chain = next_chain(below.as_ref(), &layer.diff_id);
                let _ = self.snaps.publish_staged(&chain, staged);
            }
        }
        Ok(layer.into())
    }

    /// Turn a staged tree into a layer and put it on the stage's view; the tree itself
    /// becomes the layer's snapshot.
    pub fn commit_layer(
        &self,
        op: &Op,
        staging: &Path,
        view: &mut RootView,
    ) -> Result<LayerRef, BuildError> {
        let layer =
            self.write_step_layer(op, crate::oci::layer::LayerSource::Dir(staging), None)?;
        let layer: LayerRef = layer.into();
        view.add_layer_from_dir(&self.snaps, &layer, staging)
            .map_err(|e| self.fail(&op.origin, e.to_string()))?;
        Ok(layer)
    }

    /// Write the layer of `op`. A gzip layer reuses the compressed chunks that the last
    /// layer of the same step (platform and instruction text) shares with it, and says how
    /// many it compressed.
    fn write_step_layer(
        &self,
        op: &Op,
        source: crate::oci::layer::LayerSource,
        tee: Option<&mut dyn Write>,
    ) -> Result<crate::oci::layer::Layer, BuildError> {
        // Only a hint of which earlier blob to look in: reused chunks are matched by content.
        let identity = format!("{}\0{}", self.platform.spec(), op.origin.text);
        let chunks = self.store.dir(Bucket::Chunks);
        let segment_dir = self.store.dir(Bucket::Segments);
        let previous =
            crate::cache::chunks::PreviousChunks::of_step(&chunks, &self.store.blobs, &identity);
        // The SBOM's look at this layer is taken as it is written.
        let mut scanner = crate::attest::sbom::StreamScanner::default();
        let segments = crate::cache::segments::SegmentDir::open(&segment_dir);
        let layer = crate::oci::layer::write_layer_from(
            &self.store.blobs,
            source,
            LayerOptions {
                compression: self.req.compression,
                epoch: Some(self.req.epoch),
                reuse: previous
                    .as_ref()
                    .map(|p| p as &dyn crate::oci::pgzip::ChunkReuse),
                segments: Some(&segments),
            },
            Some(&mut Metered {
                inner: Fanout(&mut scanner, tee),
                written: 0,
                shown: 0,
                show: &|n| self.req.reporter.bytes(self.step, "layer", n, None),
            }),
        )
        .map_err(|e| self.fail(&op.origin, e.to_string()))?;
        if let Some(scan) = scanner.finish() {
            crate::attest::sbom::store_scan(&self.store.dir(Bucket::Sbom), &layer.diff_id, &scan);
        }
        crate::cache::segments::remember(&segment_dir, &layer.digest, &layer.segments);
        self.req.reporter.detail(
            self.step,
            &format!(
                "layer {}: {} files read, {} bytes",
                layer.digest, layer.files_read, layer.bytes_read
            ),
        );
        if !layer.segments.is_empty() {
            self.req.reporter.detail(
                self.step,
                &format!(
                    "layer {}: {} tar segments, {} read from earlier layers",
                    layer.digest,
                    layer.segments.len(),
                    layer.segments_reused
                ),
            );
        }
        if let Compression::Gzip(level) = self.req.compression {
            crate::cache::chunks::remember(&chunks, &identity, &layer, level);
            self.req.reporter.detail(
                self.step,
                &format!(
                    "layer {}: {} chunks, {} compressed, {} reused",
                    layer.digest,
                    layer.chunks.len(),
                    layer.chunks.len() - layer.reused,
                    layer.reused
                ),
            );
        }
        Ok(layer)
    }
}

/// A layer's tar, seen by the SBOM scanner and, when given, one more reader.
struct Fanout<'a, 'b>(&'a mut dyn Write, Option<&'b mut dyn Write>);

impl Write for Fanout<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        if let Some(w) = self.1.as_mut() {
            w.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that shows how many bytes went through it, every [`Metered::EVERY`] bytes.
struct Metered<'a, W: Write> {
    inner: W,
    written: u64,
    shown: u64,
    show: &'a dyn Fn(u64),
}

impl<W: Write> Metered<'_, W> {
    const EVERY: u64 = 4 << 20;
}

impl<W: Write> Write for Metered<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if self.written - self.shown >= Self::EVERY {
            self.shown = self.written;
            (self.show)(self.written);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
