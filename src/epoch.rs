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
    // Outside a work tree git only fails: not starting it saves every such build a process.
    let repo_named = ["GIT_DIR", "GIT_WORK_TREE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let abs = std::path::absolute(context).ok()?;
    if !repo_named && !abs.ancestors().any(|d| d.join(".git").exists()) {
        return None;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_time_of_head_is_found_from_anywhere_in_the_work_tree_and_only_there() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("repo");
        fs_create(&repo.join("sub/dir"));
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(args)
                .env("GIT_COMMITTER_DATE", "@1700000000 +0000")
                .env("GIT_AUTHOR_DATE", "@1700000000 +0000")
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@t")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@t")
                .status()
                .expect("git must be installed (apt-get install git)");
            assert!(ok.success(), "git {:?}", args);
        };
        git(&["init", "-q"]);
        std::fs::write(repo.join("sub/dir/f"), "x").unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "one"]);
        assert_eq!(git_head_time(&repo), Some(1_700_000_000));
        assert_eq!(git_head_time(&repo.join("sub/dir")), Some(1_700_000_000));
        let outside = t.path().join("outside");
        fs_create(&outside);
        assert_eq!(git_head_time(&outside), None);
    }

    fn fs_create(p: &Path) {
        std::fs::create_dir_all(p).unwrap();
    }
}
