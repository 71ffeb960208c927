//! What a step reads, as typed inputs: context files (hashed through the stat cache, with
//! the listing the provenance keeps), earlier stages by their last key, and images by their
//! digest.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;

use super::cx::Ctx;
use super::inputs::StepInput;
use super::BuildError;
use crate::attest::trace::{ContextLeaf, ContextListing};
use crate::context::IgnoreMatcher;
use crate::plan::{Input, Origin};

impl Ctx<'_, '_> {
    /// What reading `source` of `from` stands for: the context by the digest of what
    /// `source` names there, a stage by its result's key, an image by its digest. Reading a
    /// stage whose chain never repeats makes this one's never repeat either.
    pub fn input_of(
        &mut self,
        origin: &Origin,
        from: &Input,
        source: &str,
        mount: Option<usize>,
    ) -> Result<StepInput, BuildError> {
        match from {
            Input::Context | Input::Local(_) => self.context_input(
                origin,
                from,
                &[source.to_string()],
                &IgnoreMatcher::default(),
                mount,
            ),
            Input::Stage(i) => {
                let name = self.stage_label(*i);
                let Some((key, volatile)) = self.stage_key(*i) else {
                    return Err(self.fail(
                        origin,
                        format!("stage {} is not built before this step", name),
                    ));
                };
                self.volatile |= volatile;
                Ok(StepInput::Stage { name, key, mount })
            }
            Input::Image(r) => {
                let digest = self.external_digest(origin, r)?;
                self.trace_image(r, &digest);
                Ok(StepInput::Image {
                    reference: r.clone(),
                    digest,
                    mount,
                })
            }
        }
    }

    /// What reading `sources` from the context sees: the digest of all of it (the key's),
    /// and each source's own digest (the provenance record's).
    pub fn context_input(
        &mut self,
        origin: &Origin,
        from: &Input,
        sources: &[String],
        excludes: &IgnoreMatcher,
        mount: Option<usize>,
    ) -> Result<StepInput, BuildError> {
        let root = self.context_root_of(origin, from)?;
        let named = match from {
            Input::Local(name) => Some(name.as_str()),
            _ => None,
        };
        let mut entries = Vec::new();
        let mut ends = Vec::new();
        for src in sources {
            let mut one = root
                .enumerate(std::slice::from_ref(src), excludes)
                .map_err(|e| self.fail(origin, e.to_string()))?;
            entries.append(&mut one);
            ends.push(entries.len());
        }
        let statted = self
            .hasher
            .stat_all(&entries)
            .map_err(|e| self.fail(origin, e.to_string()))?;
        // A read of entries that all look as they did when this read last ran takes what it
        // recorded then.
        let owner = context_owner(&root.root);
        let mut slot = std::os::unix::ffi::OsStrExt::as_bytes(root.root.as_os_str()).to_vec();
        for src in sources {
            slot.push(0);
            slot.extend_from_slice(src.as_bytes());
        }
        slot.extend_from_slice(format!("\0{}\0{}:{}", self.req.epoch, owner.0, owner.1).as_bytes());
        let key = self.hasher.listing_key(&statted, &slot, &ends);
        if let Some(r) = key.as_ref().and_then(|k| self.hasher.recall(&slot, k)) {
            if r.sources.len() == sources.len() {
                if let Ok(mut t) = self.trace.lock() {
                    t.listings_of(named).push(r.listing);
                }
                crate::cache::free_aside((entries, statted));
                return Ok(StepInput::Context {
                    sources: sources.iter().cloned().zip(r.sources).collect(),
                    digest: r.digest,
                    mount,
                    files: None,
                });
            }
        }
        self.read_previous_ahead();
        let (digest, leaves, stats) = self
            .hasher
            .describe_leaves(&entries, &statted.stats, self.req.epoch, owner)
            .map_err(|e| self.fail(origin, e.to_string()))?;
        drop(statted);
        let mut source_digests = Vec::with_capacity(sources.len());
        let mut per_source = Vec::with_capacity(sources.len());
        let mut start = 0;
        for (src, end) in sources.iter().zip(ends) {
            let covered = entries[start..end]
                .iter()
                .map(|(rel, _)| rel)
                .zip(&leaves[start..end]);
            let d = crate::attest::trace::leaves_digest(covered).to_string();
            per_source.push((src.clone(), d.clone()));
            source_digests.push(d);
            start = end;
        }
        let (rels, paths): (Vec<String>, Vec<PathBuf>) = entries.into_iter().unzip();
        if let Some(stats) = stats {
            self.source_stats
                .get_or_insert_with(HashMap::new)
                .extend(paths.into_iter().zip(stats));
        }
        // The listing is only read once the stage is done (by provenance, and by the next
        // build): it is made beside the step, in its place in the trace.
        let mut trace = self.lock_trace()?;
        let listings = trace.listings_of(named);
        let place = listings.len();
        listings.push(ContextListing::of(&BTreeMap::new()));
        drop(trace);
        let keep = key.map(|key| (self.hasher.listing_slot(&slot), key, digest.clone()));
        let files: BTreeMap<String, String> = rels
            .iter()
            .zip(&leaves)
            .map(|(rel, leaf)| (rel.clone(), super::explain::fingerprint(leaf)))
            .collect();
        let input = StepInput::Context {
            sources: per_source,
            digest,
            mount,
            files: Some(std::sync::Arc::new(files)),
        };
        let job = std::thread::spawn(move || {
            let listing = listing_of(rels, leaves);
            if let Some((slot, key, digest)) = keep {
                slot.remember(
                    &key,
                    &crate::cache::context_hash::Remembered {
                        digest,
                        sources: source_digests,
                        listing: listing.clone(),
                    },
                );
            }
            listing
        });
        self.listings.push((named.map(str::to_string), place, job));
        Ok(input)
    }
}

/// The owner of a context directory (whoever checked it out).
fn context_owner(dir: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir)
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}

/// The listing of one context read: its leaves by path. Sorted here and merged in one pass
/// (a large context's leaves, inserted one by one, cost a tree descent each); where a path
/// is listed twice, the later listing wins, as it would by insertion.
fn listing_of(rels: Vec<String>, leaves: Vec<ContextLeaf>) -> ContextListing {
    let mut listed: Vec<(String, ContextLeaf)> = rels.into_iter().zip(leaves).collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    listed.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(&mut later.1, &mut kept.1);
        }
        same
    });
    let listed: BTreeMap<String, ContextLeaf> = listed.into_iter().collect();
    ContextListing::of(&listed)
}
