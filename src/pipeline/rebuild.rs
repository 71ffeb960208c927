//! `builder verify REF`: rebuild a published image from its provenance and say whether it
//! reproduced. The provenance names the build file (path and digest), the build args,
//! target, platforms, epoch, the settings that shape the image and every base by digest;
//! the given context is checked against the files it records before anything is built;
//! the rebuild runs in a fresh store with each base pinned to its recorded digest.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::failure::CliError;
use crate::oci::root::Root;
use crate::registry::{Client, Reference};
use crate::store::sources::{self, ImageSource};

use crate::attest::provenance::{self, Recorded};
use crate::oci::digest::Digest;
use crate::oci::image::StoredImage;
use crate::store::Store;

/// The provenance the store holds about `image` (reached from `top`, the index or image a
/// reference named): from an attestation about it whose statement says it is about it. A
/// statement about another image is no provenance of this one.
pub fn recorded_provenance(store: &Store, top: &Digest, image: &StoredImage) -> Option<Recorded> {
    attached_provenance(store, top, image)
        .into_iter()
        .find_map(|(r, about_it)| about_it.then_some(r))
}

/// One published image with the provenance recorded about it.
pub struct PublishedImage {
    pub image: StoredImage,
    pub platform: String,
    pub recorded: Recorded,
    /// The statement's own subject is this image (a statement about another image, attached
    /// to this one, is never taken as its provenance).
    pub subject_matches: bool,
}

/// What a reference names, each platform with its provenance.
pub struct Published {
    pub top: Digest,
    pub images: Vec<PublishedImage>,
}

/// The provenance statements attached to `image` (as referrers, or in the index `top` is),
/// read back, with whether each says it is about `image`.
fn attached_provenance(store: &Store, top: &Digest, image: &StoredImage) -> Vec<(Recorded, bool)> {
    let mut attestations = store.attestations_of(&image.manifest_digest);
    if *top != image.manifest_digest {
        attestations.extend(store.attestations_of(top));
    }
    let mut out = Vec::new();
    for a in attestations
        .iter()
        .filter(|a| a.subject == image.manifest_digest)
    {
        for (layer, predicate) in &a.statements {
            if predicate != provenance::PREDICATE_TYPE {
                continue;
            }
            let Ok(bytes) = store.blobs.get(&layer.digest) else {
                continue;
            };
            let Ok(statement) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            if let Some(r) = provenance::read(&statement) {
                let ok = r.subject == image.manifest_digest.to_string();
                out.push((r, ok));
            }
        }
    }
    out
}

/// Fetch what `reference` names (every platform) with its provenance. An image without
/// provenance cannot be verified: that is an error naming it.
pub fn read_published(
    store: &Store,
    reference: &str,
    client: &Client,
) -> Result<Published, CliError> {
    let placed = sources::fetch_anywhere(store, reference, None, client)?;
    let mut images = Vec::new();
    for image in placed.images {
        let platform = crate::oci::image::platform_of(&image);
        let mut found = attached_provenance(store, &placed.top, &image);
        // One that is about this image, else the first (reported as not about it).
        found.sort_by_key(|(_, ok)| !*ok);
        let Some((recorded, subject_matches)) = found.into_iter().next() else {
            return Err(CliError::msg(format!(
                "{}: the {} image {} carries no provenance (builder's SLSA statement); verify \
                 rebuilds from it",
                reference, platform, image.manifest_digest
            )));
        };
        images.push(PublishedImage {
            image,
            platform,
            recorded,
            subject_matches,
        });
    }
    if images.is_empty() {
        return Err(CliError::msg(format!("{}: no image", reference)));
    }
    Ok(Published {
        top: placed.top,
        images,
    })
}

/// What a rebuild takes from the provenance: the same for every platform.
#[derive(Debug, Clone)]
pub struct RebuildPlan {
    /// The build file's path in the context, as recorded.
    pub build_file: String,
    pub build_file_digest: String,
    pub args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub platforms: Vec<String>,
    pub epoch: i64,
    pub mode: String,
    pub options: BTreeMap<String, Value>,
    /// The build's RUN steps may have used the network: the rebuild gives RUN the network
    /// the build had (else none).
    pub run_network: Option<String>,
    /// Where the provenance contradicts itself or the image (each a sentence).
    pub problems: Vec<String>,
}

/// The rebuild the provenance describes. Platforms that disagree about the build's
/// parameters, a statement about another image, or step records that read other build
/// args than the parameters say are problems: the verification fails with them.
pub fn plan_of(published: &Published) -> Result<RebuildPlan, CliError> {
    let first = &published.images[0].recorded;
    let epoch = first
        .epoch
        .ok_or_else(|| CliError::msg("the provenance records no sourceDateEpoch"))?;
    let mut problems = Vec::new();
    let mut platforms = Vec::new();
    for p in &published.images {
        let r = &p.recorded;
        if !p.subject_matches {
            problems.push(format!(
                "the {} image is {}, but its provenance statement is about {}",
                p.platform, p.image.manifest_digest, r.subject
            ));
        }
        if r.platform != p.platform {
            problems.push(format!(
                "the {} image's provenance says it is a {} build",
                p.platform, r.platform
            ));
        }
        let same = r.build_file == first.build_file
            && r.build_file_digest == first.build_file_digest
            && r.args == first.args
            && r.target == first.target
            && r.epoch == first.epoch
            && r.options == first.options;
        if !same {
            problems.push(format!(
                "the provenance of {} and {} record different build parameters",
                published.images[0].platform, p.platform
            ));
        }
        problems.extend(step_arg_conflicts(r));
        platforms.push(p.platform.clone());
    }
    // RUN's network: none where the build gave it none, or ran no RUN at all.
    let network = first
        .options
        .get("network")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let ran_run = published.images.iter().any(|p| {
        p.recorded.mode != "max"
            || p.recorded
                .steps
                .iter()
                .any(|s| s["op"].as_str().is_some_and(|op| op.starts_with("RUN")))
    });
    let run_network = (network != "none" && ran_run).then_some(network);
    Ok(RebuildPlan {
        build_file: first.build_file.clone(),
        build_file_digest: first.build_file_digest.clone(),
        args: first.args.clone(),
        target: first.target.clone(),
        platforms,
        epoch,
        mode: if first.mode.is_empty() {
            "max".into()
        } else {
            first.mode.clone()
        },
        options: first.options.clone(),
        run_network,
        problems,
    })
}

/// Build args a step's record says it read with another value than the parameters give.
fn step_arg_conflicts(r: &Recorded) -> Vec<String> {
    let mut out = Vec::new();
    for s in &r.steps {
        for input in s["inputs"].as_array().into_iter().flatten() {
            for (k, v) in input["args"].as_object().into_iter().flatten() {
                if let (Some(read), Some(given)) = (v.as_str(), r.args.get(k)) {
                    if read != given {
                        out.push(format!(
                            "build arg {}: the provenance's parameters say {:?}, but step {:?} \
                             read {:?}",
                            k,
                            given,
                            s["op"].as_str().unwrap_or(""),
                            read
                        ));
                    }
                }
            }
        }
    }
    out
}

/// How the given context compares with the files the provenance records.
#[derive(Debug, Default)]
pub struct ContextCheck {
    /// The recorded files found as recorded.
    pub matching: usize,
    /// Each differing file: its path, the recorded leaf, and what the context has (`null`
    /// when it is missing or cannot be read).
    pub differing: Vec<(String, Value, Value)>,
    /// The build file's digest here, when it differs from the recorded one.
    pub build_file: Option<String>,
}

/// Compare `context` with what the provenance of `published` records: every file it lists
/// (type, mode, content or link target) and the build file (`file`, else the recorded path
/// in the context). Every path is opened inside the context, whatever the provenance says.
pub fn check_context(
    published: &Published,
    plan: &RebuildPlan,
    context: &Path,
    file: Option<&Path>,
) -> Result<ContextCheck, CliError> {
    let root = Root::open(context).map_err(|e| CliError::io(context, e))?;
    let mut check = ContextCheck::default();
    let mut files: BTreeMap<&String, &Value> = BTreeMap::new();
    for p in &published.images {
        files.extend(p.recorded.files.iter());
    }
    for (path, recorded) in files {
        let found = leaf_in(&root, path);
        let same = |k: &str| recorded[k] == found[k];
        if !found.is_null() && same("type") && same("mode") && same("digest") && same("link") {
            check.matching += 1;
        } else {
            check
                .differing
                .push((path.clone(), recorded.clone(), found));
        }
    }
    let bytes = match file {
        Some(f) => std::fs::read(f).map_err(|e| CliError::io(f, e))?,
        None => root
            .read_regular(Path::new(&plan.build_file), 16 << 20)
            .map_err(|e| CliError::msg(format!("{}: {}", plan.build_file, e)))?
            .ok_or_else(|| {
                CliError::msg(format!(
                    "{}: the build file the provenance names is not in {} (give it with -f)",
                    plan.build_file,
                    context.display()
                ))
            })?,
    };
    let digest = Digest::of(&bytes).to_string();
    if digest != plan.build_file_digest {
        check.build_file = Some(digest);
    }
    Ok(check)
}

/// A context entry as provenance lists it (`null` when it is missing or unreadable), read
/// without following any symlink.
fn leaf_in(root: &Root, path: &str) -> Value {
    use nix::fcntl::OFlag;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let rel = Path::new(path);
    let Ok(fd) = root.open_beneath(rel, OFlag::O_PATH) else {
        return Value::Null;
    };
    let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
        return Value::Null;
    };
    let mode = format!("{:o}", st.st_mode & 0o7777);
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let Ok(file) = root.open_beneath(rel, OFlag::O_RDONLY) else {
                return Value::Null;
            };
            let mut f = std::fs::File::from(file);
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sha2::Digest::update(&mut hasher, &buf[..n]),
                    Err(_) => return Value::Null,
                }
            }
            json!({"type": "file", "mode": mode,
                   "digest": Digest::from_hasher(hasher).to_string()})
        }
        libc::S_IFDIR => json!({"type": "dir", "mode": mode}),
        libc::S_IFLNK => match nix::fcntl::readlinkat(Some(fd.as_raw_fd()), "") {
            Ok(target) => json!({"type": "symlink", "mode": mode,
                                 "link": target.to_string_lossy()}),
            Err(_) => Value::Null,
        },
        _ => json!({"type": "other", "mode": mode}),
    }
}

/// Put every image the provenance names by reference and digest into `fresh`, named as
/// the build file names it, pinned to the recorded digest (one per platform, joined in an
/// index when several): from `store` when it has them, else from the registry by digest.
/// Returns each reference with what it was pinned to.
pub fn pin_bases(
    store: &Store,
    fresh: &Store,
    published: &Published,
    client: &Client,
) -> Result<Vec<(String, Digest)>, CliError> {
    let mut wanted: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
    for p in &published.images {
        for (reference, digest) in &p.recorded.images {
            let d: Digest = digest.parse().map_err(|e: crate::oci::digest::BadDigest| {
                CliError::msg(format!(
                    "the provenance names {} by a bad digest: {}",
                    reference, e
                ))
            })?;
            let list = wanted.entry(reference.clone()).or_default();
            if !list.contains(&d) {
                list.push(d);
            }
        }
    }
    let mut pinned = Vec::new();
    for (reference, digests) in wanted {
        // A layout or archive named by path is read again as the build reads it.
        let ImageSource::Store(name) = ImageSource::parse(&reference) else {
            continue;
        };
        let mut images = Vec::new();
        for d in &digests {
            images.push(base_image(store, fresh, &name, d, client)?);
        }
        let top = if images.len() == 1 {
            images[0].manifest_digest.clone()
        } else {
            crate::oci::image::commit_index(&fresh.blobs, &images, &[])
                .map_err(|e| CliError::msg(e.to_string()))?
                .digest
        };
        fresh.tag(&name, &top)?;
        pinned.push((name, top));
    }
    Ok(pinned)
}

/// The image `digest` that `name` stood for, in `fresh`: copied from `store`, else pulled
/// from `name`'s registry by digest.
fn base_image(
    store: &Store,
    fresh: &Store,
    name: &str,
    digest: &Digest,
    client: &Client,
) -> Result<StoredImage, CliError> {
    if let Ok(img) = crate::oci::image::load(&store.blobs, digest) {
        if let Ok(copied) = super::verify::copy_image(store, fresh, &img) {
            return Ok(copied);
        }
    }
    let r = Reference::parse(name)?;
    let by_digest = Reference {
        tag: None,
        digest: Some(digest.clone()),
        ..r
    };
    let host = crate::oci::platform::Platform::host();
    let pulled = crate::registry::pull::pull(
        client,
        &fresh.local(),
        &by_digest,
        &host,
        crate::registry::pull::Layers::WhenNeeded,
    )
    .map_err(|e| {
        CliError::msg(format!(
            "the base {}@{} the provenance names cannot be had: {}",
            name, digest, e
        ))
    })?;
    if pulled.image.manifest_digest != *digest {
        return Err(CliError::msg(format!(
            "the base {}@{} is an index; the provenance names image manifests",
            name, digest
        )));
    }
    Ok(pulled.image)
}

/// Compare each published image (in `store`) with the rebuilt one of its platform (in
/// `fresh`); for those that differ, the file-level diff and the explanation from both
/// provenances.
pub fn compare(
    published: &Published,
    store: &Store,
    fresh: &Store,
    rebuilt_top: &Digest,
) -> Result<Value, CliError> {
    let (rebuilt, _) = crate::oci::image::load_all(&fresh.blobs, rebuilt_top)
        .map_err(|e| CliError::msg(e.to_string()))?;
    let mut platforms = Vec::new();
    let mut all = true;
    for p in &published.images {
        let Some(r) = rebuilt
            .iter()
            .find(|r| crate::oci::image::platform_of(r) == p.platform)
        else {
            all = false;
            platforms.push(json!({"platform": p.platform, "reproduced": false,
                "published": p.image.manifest_digest.to_string(), "rebuilt": null}));
            continue;
        };
        let same = r.manifest_digest == p.image.manifest_digest;
        all &= same;
        let mut entry = json!({
            "platform": p.platform,
            "published": p.image.manifest_digest.to_string(),
            "rebuilt": r.manifest_digest.to_string(),
            "reproduced": same,
        });
        if !same {
            entry["diff"] = crate::oci::diff::diff_images(&store.blobs, &p.image, &fresh.blobs, r)
                .map_err(|e| CliError::msg(e.to_string()))?;
        }
        match recorded_provenance(fresh, rebuilt_top, r) {
            Some(mut again) => {
                // RUN's network was the rebuild's choice; it shapes no layer.
                match p.recorded.options.get("network") {
                    Some(n) => again.options.insert("network".into(), n.clone()),
                    None => again.options.remove("network"),
                };
                if !same {
                    entry["explanation"] = crate::attest::explain::explain(
                        &p.recorded,
                        &p.image.state.layers,
                        &again,
                        &r.state.layers,
                    );
                }
                // What the published provenance says must be what the rebuild records:
                // a statement edited after the build (its inputs, its steps) is caught
                // even where the image reproduces.
                let differing = recorded_differences(&p.recorded, &again);
                if !differing.is_empty() {
                    all = false;
                    entry["reproduced"] = json!(false);
                    entry["provenanceDiffers"] = json!(differing);
                }
            }
            None => {
                all = false;
                entry["reproduced"] = json!(false);
                entry["provenanceDiffers"] = json!(["the rebuild recorded no provenance"]);
            }
        }
        platforms.push(entry);
    }
    Ok(json!({"reproduced": all, "platforms": platforms}))
}

/// The fields in which two provenance records of one build differ, leaving out what
/// depends on where it ran (the isolation RUN had) and on RUN's network (part of a RUN's
/// cache key, but of no layer).
fn recorded_differences(a: &Recorded, b: &Recorded) -> Vec<String> {
    let without_keys = |steps: &[Value]| -> Vec<Value> {
        steps
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if let Some(o) = s.as_object_mut() {
                    o.remove("cacheKey");
                }
                s
            })
            .collect()
    };
    let mut out = Vec::new();
    let mut check = |name: &str, same: bool| {
        if !same {
            out.push(name.to_string());
        }
    };
    check("subject", a.subject == b.subject);
    check(
        "buildFile",
        a.build_file == b.build_file && a.build_file_digest == b.build_file_digest,
    );
    check("args", a.args == b.args);
    check("platform", a.platform == b.platform);
    check("target", a.target == b.target);
    check("images", a.images == b.images);
    check("urls", a.urls == b.urls);
    check(
        "context",
        a.context_root == b.context_root && a.files == b.files,
    );
    check("steps", without_keys(&a.steps) == without_keys(&b.steps));
    check(
        "stages",
        a.stage_bases == b.stage_bases
            && a.stage_names == b.stage_names
            && a.target_stage == b.target_stage,
    );
    check("platforms", a.platforms == b.platforms);
    check("sourceDateEpoch", a.epoch == b.epoch);
    check("mode", a.mode == b.mode);
    check("options", a.options == b.options);
    out
}
