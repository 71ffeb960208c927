//! `--verify`: the build twice, in two fresh stores without cache and from a copy of the
//! context with shuffled mtimes; the digests must agree, else the provenance explains which
//! layers differ and why.

use crate::attest::provenance;
use crate::failure::{build_failure, CliError};
use crate::plan::OpGraph;
use crate::progress::Reporter;
use crate::solver::{self, BuildRequest};
use crate::store::Store;

/// `--verify`: two clean builds must agree; the result then goes into `store`. When they
/// disagree, their provenance explains which layers differ and why.
pub(super) fn verify(
    store: &Store,
    req: &BuildRequest,
    reporter: &dyn Reporter,
    invocation: &provenance::Invocation,
    source: &str,
) -> Result<solver::Outcome, CliError> {
    let tmp = tempfile::Builder::new()
        .prefix("builder-verify-")
        .tempdir()
        .map_err(|e| CliError::msg(format!("temporary directory: {}", e)))?;
    let stores = [
        Store::open(&tmp.path().join("a"))?,
        Store::open(&tmp.path().join("b"))?,
    ];
    for s in &stores {
        copy_base_images(store, s, &req.graph)?;
    }
    // The second build reads a copy of the context whose mtimes are all different (and later
    // than the epoch, as in a fresh checkout): mtimes must not reach the image.
    let ctx_b = tmp.path().join("context");
    crate::worker::copy_tree(&req.context, &ctx_b).map_err(|e| CliError::msg(e.to_string()))?;
    for (i, e) in walkdir::WalkDir::new(&ctx_b)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let t = req.epoch + 1 + ((i as i64).wrapping_mul(7919) % 1_000_000);
        crate::oci::unpack::set_mtime(e.path(), t);
    }
    let mut first = req.clone();
    first.no_cache = true;
    let mut second = first.clone();
    second.context = ctx_b.canonicalize().map_err(|e| CliError::io(&ctx_b, e))?;
    reporter.log(0, "--verify: first clean build");
    let a = solver::build_recorded(&stores[0], &first).map_err(|e| build_failure(e, source))?;
    reporter.log(
        0,
        "--verify: second clean build (context copy with shuffled mtimes)",
    );
    let b = solver::build_recorded(&stores[1], &second).map_err(|e| build_failure(e, source))?;
    if a.image.manifest_digest != b.image.manifest_digest {
        let report =
            crate::oci::diff::diff_images(&stores[0].blobs, &a.image, &stores[1].blobs, &b.image)
                .map_err(|e| CliError::msg(e.to_string()))?;
        let recorded = |o: &solver::Outcome| {
            let platform = crate::oci::image::platform_of(&o.image);
            let st =
                provenance::statement(invocation, &platform, &o.image.manifest_digest, &o.trace);
            provenance::read(&st).unwrap_or_default()
        };
        let why = crate::attest::explain::explain(
            &recorded(&a),
            &a.image.state.layers,
            &recorded(&b),
            &b.image.state.layers,
        );
        return Err(CliError::msg(format!(
            "not reproducible: two clean builds gave {} and {}:\n{}{}",
            a.image.manifest_digest,
            b.image.manifest_digest,
            crate::oci::diff::render(&report),
            crate::attest::explain::render(&why)
        )));
    }
    reporter.log(
        0,
        &format!(
            "--verify: both clean builds gave {}",
            a.image.manifest_digest
        ),
    );
    let image = copy_image(&stores[0], store, &a.image)?;
    Ok(solver::Outcome { image, ..a })
}

/// Copy the images a build names from the local store into `to` (FROM and --from).
fn copy_base_images(from: &Store, to: &Store, graph: &OpGraph) -> Result<(), CliError> {
    let mut names: Vec<String> = Vec::new();
    for s in &graph.stages {
        names.extend(s.images());
    }
    for n in names {
        if let crate::store::sources::ImageSource::Store(name) =
            crate::store::sources::ImageSource::parse(&n)
        {
            if let Ok(img) = from.image(&name) {
                copy_image(from, to, &img)?;
                to.tag(&name, &img.manifest_digest)?;
            }
        }
    }
    Ok(())
}

/// Copy an image's blobs between stores (verified on the way) and load it from `to`.
pub(super) fn copy_image(
    from: &Store,
    to: &Store,
    img: &crate::oci::image::StoredImage,
) -> Result<crate::oci::image::StoredImage, CliError> {
    let mut digests = vec![img.config_digest.clone(), img.manifest_digest.clone()];
    digests.extend(img.state.layers.iter().map(|l| l.digest.clone()));
    for d in digests {
        if to.blobs.contains(&d) {
            continue;
        }
        let p = from.blobs.ensure(&d)?;
        let mut f = std::fs::File::open(&p).map_err(|e| CliError::io(&p, e))?;
        let (got, _) = to.blobs.put_reader(&mut f)?;
        if got != d {
            return Err(CliError::msg(format!(
                "blob {} changed while copying it",
                d
            )));
        }
    }
    Ok(crate::oci::image::load(&to.blobs, &img.manifest_digest)
        .map_err(crate::store::StoreError::from)?)
}
