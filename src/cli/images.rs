//! Image commands: import, images, inspect, history, tag, rm, export, fsck.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::epoch;
use crate::export::{self, Output};
use crate::oci::image::{rfc3339, ImageState};
use crate::oci::layer::{write_layer, Compression, LayerOptions};
use crate::oci::platform::Platform;
use crate::oci::unpack::{self, UnpackOptions};
use crate::store::{default_root, normalize_name, sources, Store};

use super::CliError;

/// `--root` shared by every image command.
#[derive(Debug, Args)]
pub struct RootArg {
    /// The store (default $BUILDER_ROOT, else $XDG_DATA_HOME/builder, else ~/.local/share/builder).
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
}

impl RootArg {
    /// Open the store; layers it left at registries are fetched, when a command reads them,
    /// with the user's registry settings.
    pub fn open(&self) -> Result<Store, CliError> {
        let store = Store::open(&self.root.clone().unwrap_or_else(default_root))?;
        if let Ok(client) = crate::registry::Client::from_config() {
            let client = client.with_notices(|m| eprintln!("warning: {}", m));
            store.blobs.set_source(std::sync::Arc::new(
                crate::registry::lazy::RegistryBlobs::new(
                    store.origins(),
                    std::sync::Arc::new(client),
                ),
            ));
        }
        Ok(store)
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A root filesystem: a directory, or a tar archive (plain, gzip, zstd, bzip2 or xz).
    pub source: PathBuf,
    /// Name for the image.
    #[arg(short = 't', long = "tag", required = true)]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub root: RootArg,
}

/// `builder import`: a root filesystem becomes a one-layer image.
pub fn import(a: ImportArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    let tags = a
        .tags
        .iter()
        .map(|t| normalize_name(t))
        .collect::<Result<Vec<_>, _>>()?;
    let (epoch, _) = epoch::resolve(None, None).map_err(CliError::msg)?;
    let md = std::fs::metadata(&a.source).map_err(|e| CliError::io(&a.source, e))?;
    let unpacked;
    let dir = if md.is_dir() {
        a.source.clone()
    } else {
        unpacked = store.scratch_dir("import-")?;
        let opts = UnpackOptions {
            devices: nix::unistd::geteuid().is_root(),
            ownership: nix::unistd::geteuid().is_root(),
            overlay_format: false,
            metadata_only: false,
            user_xattrs: false,
            capability_xattr_only: false,
        };
        unpack::unpack_layer(
            &a.source,
            &a.source.display().to_string(),
            unpacked.path(),
            opts,
        )?;
        unpacked.path().to_path_buf()
    };
    let layer = write_layer(
        &store.blobs,
        &dir,
        LayerOptions {
            compression: Compression::Gzip(6),
            epoch: Some(epoch),
            reuse: None,
            segments: None,
        },
    )?;
    let p = Platform::host();
    let mut state = ImageState::scratch(&p.os, &p.architecture, None);
    let created = rfc3339(epoch);
    state.push_history(&created, "builder import", Some(layer.into()));
    state.config.set_created(Some(created));
    let image = state
        .commit(&store.blobs, &BTreeMap::new())
        .map_err(crate::store::StoreError::from)?;
    for t in &tags {
        store.tag(t, &image.manifest_digest)?;
    }
    println!("{}", image.manifest_digest);
    Ok(())
}

/// `builder images`.
pub fn list(root: &RootArg) -> Result<(), CliError> {
    let store = root.open()?;
    println!("{:<40} {:<20} SIZE", "NAME", "IMAGE ID");
    for (name, d) in store.refs()? {
        let size: u64 = crate::oci::image::load_all(&store.blobs, &d)
            .map(|(images, _)| {
                images
                    .iter()
                    .flat_map(|i| &i.state.layers)
                    .map(|l| l.size)
                    .sum()
            })
            .unwrap_or(0);
        println!("{:<40} {:<20} {}", name, &d.hex()[..12], human(size));
    }
    Ok(())
}

fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{}{}", n, units[0])
    } else {
        format!("{:.1}{}", v, units[u])
    }
}

/// Load an image from the store or any source builder reads.
fn load_any(store: &Store, reference: &str) -> Result<crate::oci::image::StoredImage, CliError> {
    // A stored name: from an index, this machine's platform, else the one the store has.
    if store.resolve(reference).is_ok() {
        return Ok(store.image(reference)?);
    }
    let client = crate::registry::Client::new(crate::registry::Settings::default());
    let pulling = sources::Pulling {
        policy: crate::registry::PullPolicy::Never,
        client: &client,
        log: &|_| {},
        layers: crate::registry::pull::Layers::Download,
    };
    Ok(sources::fetch(
        store,
        reference,
        &Platform::host(),
        &pulling,
    )?)
}

/// `builder inspect`.
pub fn inspect(root: &RootArg, reference: &str) -> Result<(), CliError> {
    let store = root.open()?;
    let img = load_any(&store, reference)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.blobs.get(&img.manifest_digest)?)
            .map_err(|e| CliError::msg(e.to_string()))?;
    let config: serde_json::Value = serde_json::from_slice(&store.blobs.get(&img.config_digest)?)
        .map_err(|e| CliError::msg(e.to_string()))?;
    let v = serde_json::json!({"digest": img.manifest_digest.to_string(), "manifest": manifest, "config": config});
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

/// `builder history`.
pub fn history(root: &RootArg, reference: &str) -> Result<(), CliError> {
    let store = root.open()?;
    let img = load_any(&store, reference)?;
    let mut layers = img.state.layers.iter();
    println!("{:<22} {:<10} CREATED BY", "CREATED", "SIZE");
    for h in img.state.config.history() {
        let size = if h.empty_layer().unwrap_or(false) {
            "0B".to_string()
        } else {
            layers.next().map(|l| human(l.size)).unwrap_or_default()
        };
        println!(
            "{:<22} {:<10} {}",
            h.created().clone().unwrap_or_default(),
            size,
            h.created_by().clone().unwrap_or_default()
        );
    }
    Ok(())
}

/// `builder tag`.
pub fn tag(root: &RootArg, src: &str, dst: &str) -> Result<(), CliError> {
    let store = root.open()?;
    let d = store.resolve(src)?;
    store.tag(dst, &d)?;
    Ok(())
}

/// `builder rm` (removes the name; blobs stay until pruned).
pub fn rm(root: &RootArg, names: &[String]) -> Result<(), CliError> {
    let store = root.open()?;
    for n in names {
        let d = store.untag(n)?;
        println!("Untagged: {} ({})", normalize_name(n)?, d);
    }
    Ok(())
}

/// `builder export REF -o OUTPUT`.
pub fn export_image(root: &RootArg, reference: &str, outputs: &[String]) -> Result<(), CliError> {
    let store = root.open()?;
    let names = normalize_name(reference)
        .map(|n| vec![n])
        .unwrap_or_default();
    let scratch = store.scratch_dir("export-")?;
    // A name for an index exports the index when the store has everything it lists (a pull
    // keeps only the platform asked for; then that image is exported).
    let complete_index = store.resolve(reference).ok().and_then(|d| {
        let index = stored_index(&store, &d)?;
        let bytes = store.blobs.get(&index.digest).ok()?;
        let images = crate::oci::image::index_entries(&bytes)?.len();
        let attestations = crate::oci::image::attestation_entries(&bytes).len();
        let complete = images == index.images.len() && attestations == index.attestations.len();
        complete.then_some(index)
    });
    let built = match complete_index {
        Some(index) => export::Built::Index(index),
        None => export::Built::Image(load_any(&store, reference)?),
    };
    // The attestations a build recorded beside the image, for a local output's files.
    let attested = store
        .attested(&built.digest())
        .and_then(|d| stored_index(&store, &d));
    for o in outputs {
        built.export(
            &store.blobs,
            &names,
            &Output::parse(o)?,
            scratch.path(),
            attested.as_ref(),
            &Default::default(),
        )?;
    }
    Ok(())
}

/// `builder fsck`.
pub fn fsck(root: &RootArg) -> Result<(), CliError> {
    let store = root.open()?;
    let problems = store.fsck()?;
    if problems.is_empty() {
        println!("store {} is consistent", store.root().display());
        return Ok(());
    }
    for p in &problems {
        println!("{}", p);
    }
    Err(CliError::msg(format!(
        "{} problem(s) found in {}",
        problems.len(),
        store.root().display()
    )))
}

/// `builder cache du`.
pub fn cache_du(root: &RootArg) -> Result<(), CliError> {
    let store = root.open()?;
    let u = crate::cache::gc::usage(&store)?;
    println!("cache entries:          {}", u.entries);
    println!("cache-only blobs:       {}", human(u.cache_only_bytes));
    println!("tagged image blobs:     {}", human(u.image_bytes));
    println!("unpacked snapshots:     {}", human(u.snapshot_bytes));
    println!("copy tar segments:      {}", human(u.segment_bytes));
    println!("build scratch:          {}", human(u.scratch_bytes));
    Ok(())
}

/// `builder cache prune`.
pub fn cache_prune(
    root: &RootArg,
    all: bool,
    keep: Option<&str>,
    filter: Option<&str>,
) -> Result<(), CliError> {
    let store = root.open()?;
    let keep_storage =
        match keep {
            Some(k) => Some(crate::cache::gc::parse_size(k).ok_or_else(|| {
                CliError::msg(format!("invalid --keep-storage {:?} (e.g. 10GB)", k))
            })?),
            None => None,
        };
    let older_than_secs = match filter {
        Some(f) => {
            let d = f.strip_prefix("until=").ok_or_else(|| {
                CliError::msg(format!(
                    "invalid --filter {:?}: only until=DURATION is supported",
                    f
                ))
            })?;
            Some(
                crate::syntax::instruction::parse_duration(d)
                    .ok_or_else(|| CliError::msg(format!("invalid duration {:?} (e.g. 24h)", d)))?
                    / 1_000_000_000,
            )
        }
        None => None,
    };
    let p = crate::cache::gc::prune(
        &store,
        &crate::cache::gc::PruneOptions {
            all,
            keep_storage,
            older_than_secs,
        },
    )?;
    println!(
        "removed {} cache entries, {} blobs ({}), {} snapshots, {} of build scratch",
        p.entries,
        p.blobs,
        human(p.bytes),
        p.snapshots,
        human(p.scratch_bytes)
    );
    Ok(())
}

/// A stored index with every image and attestation it lists.
fn stored_index(
    store: &Store,
    digest: &crate::oci::digest::Digest,
) -> Option<crate::oci::image::StoredIndex> {
    let (images, index) = crate::oci::image::load_all(&store.blobs, digest).ok()?;
    let index = index?;
    let bytes = store.blobs.get(&index).ok()?;
    Some(crate::oci::image::StoredIndex {
        attestations: crate::oci::image::load_attestations(&store.blobs, &index),
        digest: index,
        size: bytes.len() as u64,
        images,
    })
}

/// `builder diff A B`: exit 0 when the manifests are identical, 1 when they differ. When
/// both carry provenance, the report starts with why: the inputs that differ, and for each
/// differing layer its step and the inputs of that step that changed.
pub fn diff(
    root: &RootArg,
    a: &str,
    b: &str,
    format: &str,
    platform: Option<&str>,
) -> Result<(), CliError> {
    let json = super::flags::json_format(format)?;
    let platform = super::flags::parse_platform(platform)?;
    let store = root.open()?;
    let client =
        crate::registry::Client::from_config()?.with_notices(|m| eprintln!("warning: {}", m));
    let place = |reference: &str| -> Result<_, CliError> {
        let placed = sources::fetch_anywhere(&store, reference, Some(&platform), &client)?;
        let image = placed
            .images
            .into_iter()
            .next()
            .ok_or_else(|| CliError::msg(format!("{}: no image", reference)))?;
        let recorded = crate::pipeline::recorded_provenance(&store, &placed.top, &image);
        Ok((image, recorded))
    };
    let (ia, pa) = place(a)?;
    let (ib, pb) = place(b)?;
    let mut report = crate::oci::diff::diff_images(&store.blobs, &ia, &store.blobs, &ib)
        .map_err(|e| CliError::msg(e.to_string()))?;
    let explanation = match (pa, pb) {
        (Some(pa), Some(pb)) if report["identical"].as_bool() != Some(true) => Some(
            crate::attest::explain::explain(&pa, &ia.state.layers, &pb, &ib.state.layers),
        ),
        _ => None,
    };
    if json {
        if let Some(x) = &explanation {
            report["explanation"] = x.clone();
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        if let Some(x) = &explanation {
            print!("{}", crate::attest::explain::render(x));
        }
        print!("{}", crate::oci::diff::render(&report));
    }
    if report["identical"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(CliError::exit(1))
    }
}
