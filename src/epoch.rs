//! The one timestamp policy of a build. The epoch is `--source-date-epoch N`, else
//! `$SOURCE_DATE_EPOCH`, else the commit time of HEAD when the context is in a git work tree,
//! else 0; `now` asks for the current time (docker's behaviour). It sets the config `created`,
//! every history entry, and clamps every mtime in the layers builder writes.

use std::path::Path;
use std::process::Command;

/// Where the epoch came from, for the build log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochSource {
    Flag,
    Environment,
    GitHead,
    Default,
    Now,
}

/// Resolve the build's epoch (seconds since 1970).
/// Without a context (e.g. `builder import`) the git step is skipped.
pub fn resolve(flag: Option<&str>, context: Option<&Path>) -> Result<(i64, EpochSource), String> {
    let parse = |s: &str, what: &str| -> Result<(i64, EpochSource), String> {
        if s == "now" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            return Ok((now, EpochSource::Now));
        }
        s.trim()
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 0)
            .map(|v| {
                (
                    v,
                    if what == "flag" {
                        EpochSource::Flag
                    } else {
                        EpochSource::Environment
                    },
                )
            })
            .ok_or_else(|| {
                format!(
                    "invalid {}: {:?} (want seconds since 1970, or `now`)",
                    if what == "flag" {
                        "--source-date-epoch"
                    } else {
                        "SOURCE_DATE_EPOCH"
                    },
                    s
                )
            })
    };
    if let Some(f) = flag {
        return parse(f, "flag");
    }
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        if !v.is_empty() {
            return parse(&v, "env");
        }
    }
    if let Some(t) = context.and_then(git_head_time) {
        return Ok((t, EpochSource::GitHead));
    }
    Ok((0, EpochSource::Default))
}

fn git_head_time(context: &Path) -> Option<i64> {
    let out = Command::new("git")
        .arg("-C")
        .arg(context)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
