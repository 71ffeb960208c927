//! `builder debug cache|shell|export`: looking into builds that happened, for the dev loop.

use clap::Args;

use crate::oci::platform::Platform;
use crate::solver::explain;

use super::images::RootArg;
use super::CliError;

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The image (a name or digest in the store) whose build to list.
    reference: String,
    /// Which platform's build, for an index (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Print JSON instead of the listing.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    root: RootArg,
}

/// `builder debug cache REF`: every step of the build that made REF, with its key, whether
/// the cache had it, and why it missed.
pub fn cache(a: CacheArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p).ok_or_else(|| {
            CliError::msg(format!(
                "--platform {}: not a platform (os/arch[/variant])",
                p
            ))
        })?,
        None => Platform::host(),
    };
    let image = store
        .image_for(&a.reference, &platform.spec())
        .map_err(|e| CliError::msg(format!("{}: {}", a.reference, e)))?;
    let steps = explain::steps_of_image(&store, &image.manifest_digest).ok_or_else(|| {
        CliError::msg(format!(
            "{}: the store has no record of the build that made {} (an imported or pulled image, or one built before builds were recorded)",
            a.reference, image.manifest_digest
        ))
    })?;
    if a.json {
        let v = serde_json::json!({
            "image": image.manifest_digest.to_string(),
            "platform": platform.spec(),
            "steps": steps,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| CliError::msg(e.to_string()))?
        );
        return Ok(());
    }
    println!("{} ({})", image.manifest_digest, platform.spec());
    for s in &steps {
        let key = s.key.strip_prefix("sha256:").unwrap_or(&s.key);
        println!(
            "[{} {}] {} {:>7.2}s  {:.12}  {}",
            s.stage,
            s.step,
            if s.cached { "CACHED" } else { "RAN   " },
            s.seconds,
            key,
            crate::text::abbreviate(&s.instruction, 200)
        );
        if let Some(why) = &s.miss {
            println!("    cache miss: {}", why);
        }
    }
    let ran = steps.iter().filter(|s| !s.cached).count();
    println!(
        "{} steps: {} ran, {} cached",
        steps.len(),
        ran,
        steps.len() - ran
    );
    Ok(())
}
