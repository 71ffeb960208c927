//! Git sources, in BuildKit's syntax: `ADD https://host/repo.git#ref[:subdir]`,
//! `git@host:repo.git#ref`, `git://`, `ssh://`, and the same as a `--build-context`. The
//! system's git does the work (builder is no git client): `ls-remote` resolves the ref to a
//! commit, which keys the step and goes into the provenance; a shallow fetch of that commit
//! gives the tree, whose modes and mtimes are made what git stores (0644 or 0755, the
//! commit's time), so one commit gives one layer on any machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A git source: where, which ref (a branch, tag or commit; HEAD when absent), and the
/// directory of the tree to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    pub remote: String,
    pub reference: Option<String>,
    pub subdir: Option<String>,
}

/// Whether `s` names a git repository, as BuildKit tells: a `git://`, `ssh://` or `git@`
/// address, or an http(s) URL whose path ends in `.git`.
pub fn is_git(s: &str) -> bool {
    let remote = s.split('#').next().unwrap_or(s);
    if remote.starts_with("git://") || remote.starts_with("ssh://") || remote.starts_with("git@") {
        return true;
    }
    (remote.starts_with("https://") || remote.starts_with("http://"))
        && remote.trim_end_matches('/').ends_with(".git")
}

impl GitSource {
    /// `REMOTE[#REF[:SUBDIR]]`.
    pub fn parse(s: &str) -> Result<GitSource, String> {
        if !is_git(s) {
            return Err(format!("{}: not a git repository address", s));
        }
        let (remote, fragment) = match s.split_once('#') {
            Some((r, f)) => (r, Some(f)),
            None => (s, None),
        };
        let (reference, subdir) = match fragment {
            None => (None, None),
            Some(f) => match f.split_once(':') {
                Some((r, d)) => (Some(r), Some(d)),
                None => (Some(f), None),
            },
        };
        let reference = reference.filter(|r| !r.is_empty()).map(str::to_string);
        if let Some(r) = &reference {
            if r.starts_with('-') || r.contains("..") || r.chars().any(char::is_whitespace) {
                return Err(format!("{}: invalid git ref {:?}", s, r));
            }
        }
        let subdir = subdir
            .map(|d| d.trim_matches('/').to_string())
            .filter(|d| !d.is_empty());
        if let Some(d) = &subdir {
            if d.split('/').any(|c| c == "..") {
                return Err(format!("{}: the subdirectory leaves the repository", s));
            }
        }
        if remote.starts_with('-') {
            return Err(format!("{}: invalid git address", s));
        }
        Ok(GitSource {
            remote: remote.to_string(),
            reference,
            subdir,
        })
    }
}

/// What git needs to reach a remote: a token for https (BuildKit's `GIT_AUTH_TOKEN` secret)
/// and an ssh agent for ssh addresses.
#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    pub token: Option<String>,
    pub ssh_agent: Option<PathBuf>,
}

fn git(auth: &GitAuth, remote: &str) -> Command {
    let mut c = Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(Stdio::null());
    if let (Some(token), true) = (&auth.token, remote.starts_with("https://")) {
        use base64::Engine;
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{}", token));
        c.arg("-c")
            .arg(format!("http.extraheader=Authorization: basic {}", basic));
    }
    match &auth.ssh_agent {
        Some(sock) => {
            c.env("SSH_AUTH_SOCK", sock);
        }
        None => {
            c.env_remove("SSH_AUTH_SOCK");
        }
    }
    c
}

fn run(mut c: Command, what: &str) -> Result<String, String> {
    let out = c
        .output()
        .map_err(|e| format!("{}: git: {} (install git)", what, e))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            what,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit `source`'s ref names now (`git ls-remote`): a tag (peeled), else a branch,
/// else any ref of that name; a full commit id is its own.
pub fn resolve(source: &GitSource, auth: &GitAuth) -> Result<String, String> {
    let reference = source.reference.clone().unwrap_or_else(|| "HEAD".into());
    if is_commit(&reference) {
        return Ok(reference.to_lowercase());
    }
    let mut c = git(auth, &source.remote);
    c.args(["ls-remote", "--", &source.remote]);
    let listing = run(c, &format!("git ls-remote {}", source.remote))?;
    let refs: Vec<(&str, &str)> = listing.lines().filter_map(|l| l.split_once('\t')).collect();
    let wanted = [
        format!("refs/tags/{}^{{}}", reference),
        format!("refs/tags/{}", reference),
        format!("refs/heads/{}", reference),
        reference.clone(),
    ];
    for w in &wanted {
        if let Some((sha, _)) = refs.iter().find(|(_, name)| name == w) {
            return Ok(sha.to_string());
        }
    }
    Err(format!(
        "{}: no ref {:?} (branches, tags and commits are looked up)",
        source.remote, reference
    ))
}

/// Check out `commit` of `source` into `dir` (new), its tree as git stores it; `.git` is kept
/// only with `keep_git_dir`. Returns the commit's time (seconds).
pub fn checkout(
    source: &GitSource,
    commit: &str,
    dir: &Path,
    keep_git_dir: bool,
    auth: &GitAuth,
) -> Result<i64, String> {
    let what = format!("git fetch {}", source.remote);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {}", dir.display(), e))?;
    let in_dir = |args: &[&str]| {
        let mut c = git(auth, &source.remote);
        c.arg("-C").arg(dir).args(args);
        c
    };
    run(in_dir(&["init", "-q"]), &what)?;
    // The ref by name first (any server serves it), then the commit itself.
    let by_name = source
        .reference
        .as_deref()
        .filter(|r| !is_commit(r))
        .map(|r| {
            run(
                in_dir(&["fetch", "-q", "--depth", "1", "--", &source.remote, r]),
                &what,
            )
        });
    let fetched_head = run(
        in_dir(&["rev-parse", "-q", "--verify", "FETCH_HEAD"]),
        &what,
    )
    .ok()
    .map(|s| s.trim().to_string());
    let have_commit = matches!(by_name, Some(Ok(_))) && fetched_head.as_deref() == Some(commit);
    if !have_commit {
        let direct = run(
            in_dir(&["fetch", "-q", "--depth", "1", "--", &source.remote, commit]),
            &what,
        );
        if direct.is_err() {
            // A server that serves no commit by id: everything, then the commit.
            run(
                in_dir(&[
                    "fetch",
                    "-q",
                    "--tags",
                    "--",
                    &source.remote,
                    "+refs/heads/*:refs/remotes/origin/*",
                ]),
                &what,
            )?;
        }
    }
    run(
        in_dir(&["-c", "advice.detachedHead=false", "checkout", "-q", commit]),
        &format!("git checkout {}", commit),
    )?;
    let _ = run(
        in_dir(&[
            "submodule",
            "update",
            "--init",
            "--recursive",
            "--depth",
            "1",
        ]),
        "git submodule update",
    );
    let time: i64 = run(in_dir(&["log", "-1", "--format=%ct", commit]), &what)?
        .trim()
        .parse()
        .map_err(|_| format!("{}: the commit has no time", what))?;
    if !keep_git_dir {
        let g = dir.join(".git");
        std::fs::remove_dir_all(&g).map_err(|e| format!("{}: {}", g.display(), e))?;
    }
    normalize(dir, time).map_err(|e| format!("{}: {}", dir.display(), e))?;
    Ok(time)
}

/// Modes as git stores them (0755 for an executable file and every directory, 0644 for the
/// rest), whatever the umask, and every mtime the commit's.
fn normalize(dir: &Path, time: i64) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in walkdir::WalkDir::new(dir).contents_first(true) {
        let e = e.map_err(std::io::Error::other)?;
        let md = std::fs::symlink_metadata(e.path())?;
        if !md.file_type().is_symlink() {
            let mode = if md.is_dir() || md.permissions().mode() & 0o100 != 0 {
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode))?;
        }
        crate::oci::unpack::set_mtime(e.path(), time);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_buildkit_reads_them() {
        let g = GitSource::parse("https://example.com/r.git#v1:sub/dir/").unwrap();
        assert_eq!(g.remote, "https://example.com/r.git");
        assert_eq!(g.reference.as_deref(), Some("v1"));
        assert_eq!(g.subdir.as_deref(), Some("sub/dir"));
        let g = GitSource::parse("git@github.com:o/r.git#main").unwrap();
        assert_eq!(g.remote, "git@github.com:o/r.git");
        let g = GitSource::parse("git://127.0.0.1/r").unwrap();
        assert_eq!((g.reference, g.subdir), (None, None));
        assert!(!is_git("https://example.com/file.tar.gz"));
        assert!(is_git("ssh://git@host/r"));
        assert!(GitSource::parse("git://h/r#--upload-pack=x").is_err());
        assert!(GitSource::parse("git://h/r#main:../up").is_err());
    }
}
