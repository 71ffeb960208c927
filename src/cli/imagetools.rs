//! `builder imagetools create|inspect`: join images pushed by digest (one per platform, each
//! built on its own machine) into one index, as `docker buildx imagetools` does, and show an
//! index and its platforms.
//!
//! The joined index lists the images in the order given (then, for sources in BuildKit's
//! layout, their attestation manifests): the very bytes a single build of every platform
//! pushes, since each platform's attestations describe that platform's build alone. The
//! images' referrers (their attestations) are copied to where the index goes.

use std::sync::Arc;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::oci::document::{Descriptor, Index, PlatformSpec};
use crate::oci::image::{MEDIA_INDEX, REFERENCE_TYPE};
use crate::registry::pull::{descriptor, fetch_blob, get_manifest, is_index};
use crate::registry::{push, Client, Reference};
use crate::store::Store;

use super::images::RootArg;
use super::CliError;

#[derive(Debug, Subcommand)]
pub enum ImagetoolsCommand {
    /// Join images (each `REPO@sha256:…`, or an index of them) into one index, and push it
    /// to every `-t` name.
    Create(CreateArgs),
    /// Show an image or index at a registry, with the platforms it holds.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Where the index goes (repeatable).
    #[arg(short = 't', long = "tag", required = true)]
    tags: Vec<String>,
    /// Print the index instead of pushing it.
    #[arg(long)]
    dry_run: bool,
    /// The images to join, in the index's order.
    #[arg(required = true)]
    sources: Vec<String>,
    #[command(flatten)]
    root: RootArg,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    reference: String,
    /// Print the manifest or index as the registry holds it.
    #[arg(long)]
    raw: bool,
}

pub fn run(cmd: ImagetoolsCommand) -> Result<(), CliError> {
    match cmd {
        ImagetoolsCommand::Create(a) => create(a),
        ImagetoolsCommand::Inspect(a) => inspect(a),
    }
}

fn client() -> Result<Arc<Client>, CliError> {
    Ok(Arc::new(
        Client::from_config()?.with_notices(|m| eprintln!("warning: {}", m)),
    ))
}

/// What one source adds to the index: its images, and their attestation manifests; and
/// the attestations its registry lists as referrers of those images.
struct Entries {
    images: Vec<Descriptor>,
    attestations: Vec<Descriptor>,
    referrers: Vec<crate::oci::image::StoredAttestation>,
}

fn create(a: CreateArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    let client = client()?;
    let mut images = Vec::new();
    let mut attestations = Vec::new();
    let mut referrers = Vec::new();
    for source in &a.sources {
        let r = Reference::parse(source)?.with_default_tag();
        let mut e = entries_of(&client, &store, &r)?;
        for image in &e.images {
            e.referrers
                .extend(crate::registry::pull::fetch_referred_attestations(
                    &client,
                    &store.local(),
                    &r.registry,
                    &r.repository,
                    &image.digest,
                    &r.familiar(),
                )?);
        }
        images.extend(e.images);
        attestations.extend(e.attestations);
        referrers.extend(e.referrers);
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &images {
        let p = d
            .platform
            .as_ref()
            .map(PlatformSpec::spec)
            .unwrap_or_default();
        if !seen.insert(p.clone()) {
            return Err(CliError::msg(format!(
                "two images for platform {}: join one image per platform",
                p
            )));
        }
    }
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_INDEX.into(),
        manifests: images.into_iter().chain(attestations).collect(),
        annotations: Default::default(),
    };
    let bytes = crate::oci::document::to_canonical(&index);
    if a.dry_run {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let digest = store
        .blobs
        .put(&bytes)
        .map_err(|e| CliError::msg(e.to_string()))?;
    for t in &a.tags {
        let dest = Reference::parse(t)?.with_default_tag();
        let mut pushed = push::push(&client, &store.local(), &digest, &dest)?;
        pushed.referrers +=
            push::push_attestations(&client, &store.local(), &referrers, &dest)?.len();
        eprintln!("{}", crate::pipeline::pushed_line(&dest, &pushed));
    }
    println!("{}", digest);
    Ok(())
}

/// The entries `r` adds: an index's own, or one image's with its platform. Every manifest
/// is kept in the store, and the layers it names are remembered at `r`'s repository, so
/// that a push to another repository mounts them instead of downloading them.
fn entries_of(client: &Client, store: &Store, r: &Reference) -> Result<Entries, CliError> {
    let what = r.familiar();
    let ep = client.endpoint(&r.registry)?;
    let top = get_manifest(client, &ep, &r.repository, &r.manifest_ref(), &what)?;
    let top_value: Value = serde_json::from_slice(&top.bytes)
        .map_err(|e| CliError::msg(format!("{}: {}", what, e)))?;
    let mut entries = Entries {
        images: Vec::new(),
        attestations: Vec::new(),
        referrers: Vec::new(),
    };
    let listed: Vec<Descriptor> =
        if is_index(&top.media_type) || is_index(top_value["mediaType"].as_str().unwrap_or("")) {
            let index: Index = serde_json::from_slice(&top.bytes)
                .map_err(|e| CliError::msg(format!("{}: {}", what, e)))?;
            index.manifests
        } else {
            store
                .blobs
                .put(&top.bytes)
                .map_err(|e| CliError::msg(e.to_string()))?;
            let mut d = Descriptor::new(
                top.media_type.clone(),
                top.digest.clone(),
                top.bytes.len() as u64,
            );
            d.platform = Some(platform_of_manifest(client, &ep, store, r, &top_value)?);
            keep_manifest(client, &ep, store, r, &top_value)?;
            entries.images.push(d);
            return Ok(entries);
        };
    for d in listed {
        let child = get_manifest(client, &ep, &r.repository, &d.digest.to_string(), &what)?;
        store
            .blobs
            .put(&child.bytes)
            .map_err(|e| CliError::msg(e.to_string()))?;
        let v: Value = serde_json::from_slice(&child.bytes)
            .map_err(|e| CliError::msg(format!("{}: {}", what, e)))?;
        keep_manifest(client, &ep, store, r, &v)?;
        if d.annotations.contains_key(REFERENCE_TYPE) {
            entries.attestations.push(d);
        } else {
            entries.images.push(d);
        }
    }
    Ok(entries)
}

/// Keep a manifest's config in the store, and remember its layers at `r`'s repository.
fn keep_manifest(
    client: &Client,
    ep: &crate::registry::client::Endpoint,
    store: &Store,
    r: &Reference,
    manifest: &Value,
) -> Result<(), CliError> {
    let what = r.familiar();
    let config = descriptor(&manifest["config"], &what)?;
    fetch_blob(client, ep, &store.blobs, &r.repository, &config)?;
    store
        .origins()
        .record(&config.digest, &r.registry, &r.repository);
    for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
        let d = descriptor(&l, &what)?;
        if !store.blobs.contains(&d.digest) {
            store
                .origins()
                .remember_lazy(&d, &r.registry, &r.repository);
        } else {
            store
                .origins()
                .record(&d.digest, &r.registry, &r.repository);
        }
    }
    Ok(())
}

/// The platform an image manifest's config names.
fn platform_of_manifest(
    client: &Client,
    ep: &crate::registry::client::Endpoint,
    store: &Store,
    r: &Reference,
    manifest: &Value,
) -> Result<PlatformSpec, CliError> {
    let what = r.familiar();
    let config = descriptor(&manifest["config"], &what)?;
    fetch_blob(client, ep, &store.blobs, &r.repository, &config)?;
    let bytes = store
        .blobs
        .get(&config.digest)
        .map_err(|e| CliError::msg(e.to_string()))?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| CliError::msg(format!("{}: {}", what, e)))?;
    Ok(PlatformSpec {
        os: v["os"].as_str().unwrap_or("").to_string(),
        architecture: v["architecture"].as_str().unwrap_or("").to_string(),
        variant: v["variant"].as_str().map(str::to_string),
    })
}

fn inspect(a: InspectArgs) -> Result<(), CliError> {
    let client = client()?;
    let r = Reference::parse(&a.reference)?.with_default_tag();
    let what = r.familiar();
    let ep = client.endpoint(&r.registry)?;
    let top = get_manifest(&client, &ep, &r.repository, &r.manifest_ref(), &what)?;
    if a.raw {
        println!("{}", String::from_utf8_lossy(&top.bytes));
        return Ok(());
    }
    println!("Name:      {}", what);
    println!("MediaType: {}", top.media_type);
    println!("Digest:    {}", top.digest);
    let referrers_of = |d: &crate::oci::digest::Digest| -> Result<(), CliError> {
        let (listed, _) =
            crate::registry::pull::list_referrers(&client, &ep, &r.repository, d, &what)?;
        for m in listed {
            println!(
                "  Referrer:    {}@{} ({})",
                r.familiar_name(),
                m["digest"].as_str().unwrap_or(""),
                m["artifactType"].as_str().unwrap_or("")
            );
        }
        Ok(())
    };
    let index = match serde_json::from_slice::<Index>(&top.bytes) {
        Ok(index) if is_index(&index.media_type) || is_index(&top.media_type) => index,
        _ => {
            // One image: its attestations are its referrers.
            println!();
            return referrers_of(&top.digest);
        }
    };
    println!();
    println!("Manifests:");
    let repo = r.familiar_name();
    for d in &index.manifests {
        println!("  Name:        {}@{}", repo, d.digest);
        println!("  MediaType:   {}", d.media_type);
        if d.annotations.contains_key(REFERENCE_TYPE) {
            println!("  Platform:    unknown/unknown");
            for (k, v) in &d.annotations {
                println!("  Annotations: {}: {}", k, v);
            }
        } else {
            if let Some(p) = &d.platform {
                println!("  Platform:    {}", p.spec());
            }
            referrers_of(&d.digest)?;
        }
        println!();
    }
    Ok(())
}
