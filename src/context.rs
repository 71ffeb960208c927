//! The build context as COPY and ADD see it: paths relative to its root, filtered by
//! `.dockerignore`, globs matched per path segment, and nothing read outside it. A source that
//! climbs out with `..`, or is a symlink leading out, is an error naming the path.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// The context's filter (`.dockerignore`, `--exclude`) and path cleaning, for the modules
/// that read the context.
pub use crate::syntax::dockerignore::{clean_path, IgnoreMatcher};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{path}: {msg}")]
    Outside { path: String, msg: String },
    #[error("{0}: not found in the build context")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A directory files are copied from: the build context (with its ignore rules) or the root
/// filesystem of a stage or image (no rules, symlinks resolved inside it).
#[derive(Debug, Clone)]
pub struct SourceRoot {
    pub root: PathBuf,
    pub ignore: IgnoreMatcher,
    /// True for the build context: a symlink leaving it is an error. For image roots it is
    /// resolved as the image would see it.
    pub is_context: bool,
    /// Excluded directories the walk entered, and whether something below each is kept.
    kept_below: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>,
}

/// One matched source: its path relative to the root and where it is on disk.
#[derive(Debug, Clone)]
pub struct Source {
    /// As shown and matched (a name that is not UTF-8 is shown with replacement characters).
    pub rel: String,
    /// The same path relative to the root, its bytes exactly as they are on disk.
    pub exact: PathBuf,
    pub path: PathBuf,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Go `filepath.Match` for one path segment (no `/` in name).
pub fn segment_match(pattern: &str, name: &str) -> bool {
    let n: Vec<char> = name.chars().collect();
    crate::syntax::glob::segment(pattern).is_some_and(|g| g.matches(&n))
}

impl SourceRoot {
    /// The build context (or a named one) at `root`, filtered by `ignore`.
    pub fn context(root: PathBuf, ignore: IgnoreMatcher) -> SourceRoot {
        SourceRoot {
            root,
            ignore,
            is_context: true,
            kept_below: Default::default(),
        }
    }

    /// The root filesystem of a stage or an image: no rules, symlinks resolved inside it.
    pub fn image(root: PathBuf) -> SourceRoot {
        SourceRoot {
            root,
            ignore: IgnoreMatcher::default(),
            is_context: false,
            kept_below: Default::default(),
        }
    }

    /// Clean a source path: relative to the root, never climbing out of it.
    pub fn clean(&self, src: &str) -> Result<String, ContextError> {
        let cleaned = clean_path(&format!("/{}", src));
        let rel = cleaned.trim_start_matches('/').to_string();
        if self.is_context
            && Path::new(src)
                .components()
                .filter(|c| matches!(c, Component::ParentDir))
                .count()
                > 0
        {
            let depth_ok = {
                let mut depth: i64 = 0;
                let mut ok = true;
                for seg in src.split('/') {
                    match seg {
                        ".." => {
                            depth -= 1;
                            ok &= depth >= 0;
                        }
                        "" | "." => {}
                        _ => depth += 1,
                    }
                }
                ok
            };
            if !depth_ok {
                return Err(ContextError::Outside { path: src.to_string(), msg: "is outside the build context (sources are relative to the context and cannot use '..' to leave it)".into() });
            }
        }
        Ok(if rel.is_empty() { ".".into() } else { rel })
    }

    /// Whether `rel` is outside the context as `.dockerignore` shapes it (see
    /// [`IgnoreMatcher::is_walked_out`]). An excluded directory that the walk enters for an
    /// exception is part of the context only ahead of something kept inside it, as
    /// BuildKit's context walk (fsutil's filterFS, since v0.10) sends it; dockerd 20.10
    /// sent it anyway.
    fn ignored(&self, rel: &str) -> bool {
        if !self.is_context || rel == "." || self.ignore.is_empty() {
            return false;
        }
        let is_dir = fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| m.is_dir());
        if self.ignore.is_walked_out(rel, is_dir) {
            return true;
        }
        is_dir && self.ignore.is_ignored(rel) && !self.keeps_something_below(rel)
    }

    /// Whether anything below the directory `rel` is part of the context. Remembered: a walk
    /// asks again for each directory below.
    fn keeps_something_below(&self, rel: &str) -> bool {
        let known = self
            .kept_below
            .lock()
            .ok()
            .and_then(|k| k.get(rel).copied());
        if let Some(kept) = known {
            return kept;
        }
        let kept = fs::read_dir(self.root.join(rel)).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                !self.ignored(&join_rel(rel, &name.to_string_lossy()))
            })
        });
        if let Ok(mut k) = self.kept_below.lock() {
            k.insert(rel.to_string(), kept);
        }
        kept
    }

    /// Resolve one cleaned relative path to disk, following symlinks inside the root; for the
    /// context a symlink that leads outside is an error.
    fn locate(&self, rel: &Path, shown: &str) -> Result<PathBuf, ContextError> {
        if rel == Path::new(".") {
            return Ok(self.root.clone());
        }
        if !self.is_context {
            return crate::oci::unpack::resolve_in_root(&self.root, rel).map_err(|source| {
                ContextError::Io {
                    path: self.root.join(rel),
                    source,
                }
            });
        }
        let p = self.root.join(rel);
        if fs::symlink_metadata(&p).is_err() {
            return Err(ContextError::NotFound(shown.to_string()));
        }
        let real = fs::canonicalize(&p).map_err(|_| ContextError::Outside {
            path: shown.to_string(),
            msg: "is a symlink whose target does not exist in the build context".into(),
        })?;
        let root = fs::canonicalize(&self.root).map_err(|source| ContextError::Io {
            path: self.root.clone(),
            source,
        })?;
        if !real.starts_with(&root) {
            return Err(ContextError::Outside {
                path: shown.to_string(),
                msg: format!(
                    "is a symlink to {}, which is outside the build context",
                    real.display()
                ),
            });
        }
        Ok(real)
    }

    /// Expand one source (possibly a glob) into matches, sorted.
    pub fn expand(&self, src: &str) -> Result<Vec<Source>, ContextError> {
        let rel = self.clean(src)?;
        if !has_glob(&rel) {
            if self.ignored(&rel) {
                return Err(ContextError::NotFound(src.to_string()));
            }
            let path = self.locate(Path::new(&rel), src)?;
            if fs::symlink_metadata(&path).is_err() {
                return Err(ContextError::NotFound(src.to_string()));
            }
            return Ok(vec![Source {
                exact: PathBuf::from(&rel),
                rel,
                path,
            }]);
        }
        // Each match as shown (UTF-8) and as it is on disk (its exact bytes, which a name
        // that is not UTF-8 keeps).
        let mut found: Vec<(String, PathBuf)> = vec![(String::new(), PathBuf::new())];
        for seg in rel.split('/') {
            let mut next = Vec::new();
            for (base, exact) in &found {
                if !has_glob(seg) {
                    let cand = if base.is_empty() {
                        seg.to_string()
                    } else {
                        format!("{}/{}", base, seg)
                    };
                    let exact = exact.join(seg);
                    if fs::symlink_metadata(self.root.join(&exact)).is_ok() {
                        next.push((cand, exact));
                    }
                    continue;
                }
                let Ok(rd) = fs::read_dir(self.root.join(exact)) else {
                    continue;
                };
                let mut names: Vec<std::ffi::OsString> =
                    rd.flatten().map(|e| e.file_name()).collect();
                names.sort();
                for n in names {
                    let shown = n.to_string_lossy();
                    if segment_match(seg, &shown) {
                        next.push((
                            if base.is_empty() {
                                shown.into_owned()
                            } else {
                                format!("{}/{}", base, shown)
                            },
                            exact.join(&n),
                        ));
                    }
                }
            }
            found = next;
        }
        let mut out = Vec::new();
        for (rel, exact) in found {
            if self.ignored(&rel) {
                continue;
            }
            let path = self.locate(&exact, &rel)?;
            out.push(Source { rel, exact, path });
        }
        // A wildcard that matches nothing copies nothing; it is not an error (BuildKit's
        // AllowEmptyWildcard).
        Ok(out)
    }

    /// Every entry a COPY of `sources` reads (matches, and everything below matched
    /// directories that the ignore file and `excludes` keep), as (relative path, disk path).
    pub fn enumerate(
        &self,
        sources: &[String],
        excludes: &IgnoreMatcher,
    ) -> Result<Vec<(String, PathBuf)>, ContextError> {
        let mut out = Vec::new();
        for src in sources {
            for m in self.expand(src)? {
                out.push((m.rel.clone(), m.path.clone()));
                if !m.path.is_dir() {
                    continue;
                }
                let prefix = if m.rel == "." { "" } else { m.rel.as_str() };
                let mut walked = walk_sorted_parallel(&m.path, prefix)?;
                // --exclude matches the part below the copied directory.
                let below = if prefix.is_empty() {
                    0
                } else {
                    prefix.len() + 1
                };
                walked.retain(|(rel, _)| {
                    !(self.excluded(rel)
                        || (!excludes.is_empty() && excludes.is_ignored(&rel[below..])))
                });
                out.append(&mut walked);
            }
        }
        Ok(out)
    }

    /// Whether a path below a copied directory is excluded by the ignore file.
    pub fn excluded(&self, rel: &str) -> bool {
        self.ignored(rel)
    }
}

/// A subtree's entries, as one walk thread lists them.
type WalkedSubtree = Result<Vec<(String, PathBuf)>, ContextError>;

/// [`walk_sorted`], its subtrees walked on a thread per CPU: the tree is split where it
/// first has several directories, and the parts are joined in order (the same list).
fn walk_sorted_parallel(dir: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>, ContextError> {
    enum Part {
        Listed(Vec<(String, PathBuf)>),
        Below(PathBuf, String),
    }
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if jobs == 1 {
        return walk_sorted(dir, prefix);
    }
    // Split until there are enough subtrees to share (or a few levels down, whatever the
    // tree is: a deep chain of single directories is walked as one).
    let mut parts = vec![Part::Below(dir.to_path_buf(), prefix.to_string())];
    for _ in 0..3 {
        let subtrees = parts
            .iter()
            .filter(|p| matches!(p, Part::Below(..)))
            .count();
        if subtrees == 0 || subtrees >= 4 * jobs {
            break;
        }
        let mut next = Vec::with_capacity(parts.len());
        for p in parts {
            let (d, rel) = match p {
                Part::Below(d, rel) => (d, rel),
                listed => {
                    next.push(listed);
                    continue;
                }
            };
            for (name, is_dir) in list_sorted(&d)? {
                let path = d.join(&name);
                let sub = join_rel(&rel, &name.to_string_lossy());
                next.push(Part::Listed(vec![(sub.clone(), path.clone())]));
                if is_dir {
                    next.push(Part::Below(path, sub));
                }
            }
        }
        parts = next;
    }
    let below: Vec<(usize, &PathBuf, &String)> = parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Part::Below(d, rel) => Some((i, d, rel)),
            Part::Listed(_) => None,
        })
        .collect();
    let walked: Vec<std::sync::Mutex<Option<WalkedSubtree>>> =
        below.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(below.len()) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((_, d, rel)) = below.get(k) else {
                    break;
                };
                let r = walk_sorted(d, rel);
                if let Ok(mut slot) = walked[k].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    let mut walked = walked.into_iter();
    let mut out = Vec::new();
    for p in parts {
        match p {
            Part::Listed(mut v) => out.append(&mut v),
            Part::Below(d, _) => {
                let r = walked
                    .next()
                    .and_then(|m| m.into_inner().ok().flatten())
                    .unwrap_or_else(|| {
                        Err(ContextError::Io {
                            path: d.clone(),
                            source: std::io::Error::other("a walking thread panicked"),
                        })
                    });
                out.append(&mut r?);
            }
        }
    }
    Ok(out)
}

/// A directory's entries (name, whether a directory, by the type readdir gives: no stat, and
/// a symlink is never a directory), in the byte order of their names.
fn list_sorted(d: &Path) -> Result<Vec<(std::ffi::OsString, bool)>, ContextError> {
    let io_err = |source| ContextError::Io {
        path: d.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    // Opened as the walk's other opens are: below the context, no symlink followed.
    let fd = crate::oci::at::open_dir(d, nix::fcntl::OFlag::O_RDONLY).map_err(io_err)?;
    let base = fd.as_raw_fd();
    let mut dir = nix::dir::Dir::from_fd(
        nix::fcntl::fcntl(base, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
            .map_err(|e| io_err(e.into()))?,
    )
    .map_err(|e| io_err(e.into()))?;
    for e in dir.iter() {
        let e = e.map_err(|e| io_err(e.into()))?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match e.file_type() {
            Some(t) => t == nix::dir::Type::Directory,
            // A file system that does not say: ask, without following.
            None => nix::sys::stat::fstatat(
                Some(base),
                e.file_name(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .map_err(|e| io_err(e.into()))?,
        };
        names.push((std::ffi::OsStr::from_bytes(name).to_os_string(), is_dir));
    }
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(names)
}

/// The names in the directory `d`, in the byte order of their names, read as the walk reads
/// a directory: below the context, opened with no symlink followed.
pub fn names_sorted(d: &Path) -> Result<Vec<std::ffi::OsString>, ContextError> {
    Ok(list_sorted(d)?.into_iter().map(|(name, _)| name).collect())
}

/// `name` under the relative path `prefix` (none when it is empty).
fn join_rel(prefix: &str, name: &str) -> String {
    let mut sub = String::with_capacity(prefix.len() + 1 + name.len());
    if !prefix.is_empty() {
        sub.push_str(prefix);
        sub.push('/');
    }
    sub.push_str(name);
    sub
}

/// Everything below `dir` (not `dir` itself) as (path relative to `dir`, path): depth first,
/// a directory before what it holds, each directory's entries in the byte order of their
/// names; symlinks are not followed. An explicit stack, so depth costs no recursion. Each
/// relative path is under `prefix` (none when it is empty).
fn walk_sorted(dir: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>, ContextError> {
    let mut out = Vec::new();
    let list = |d: &Path| list_sorted(d).map(Vec::into_iter);
    // (directory, its relative path, its entries still to visit)
    let mut stack = vec![(dir.to_path_buf(), prefix.to_string(), list(dir)?)];
    while let Some((d, prefix, entries)) = stack.last_mut() {
        let Some((name, is_dir)) = entries.next() else {
            stack.pop();
            continue;
        };
        let path = d.join(&name);
        let sub = join_rel(prefix, &name.to_string_lossy());
        if is_dir {
            let entries = list(&path)?;
            out.push((sub.clone(), path.clone()));
            stack.push((path, sub, entries));
        } else {
            out.push((sub, path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_is_walkdirs_sorted_preorder() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["a/b/c", "a-b", "a.b", "B", "z/y"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        for f in ["a/b/c/f", "a/b/0", "a/x", "a-b/1", "B/é", "top", "z/y/deep"] {
            fs::write(r.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("a", r.join("link-to-dir")).unwrap();
        let reference: Vec<(String, PathBuf)> = walkdir::WalkDir::new(r)
            .min_depth(1)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                let sub = e
                    .path()
                    .strip_prefix(r)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (sub, e.path().to_path_buf())
            })
            .collect();
        assert_eq!(walk_sorted(r, "").unwrap(), reference);
        assert!(walk_sorted(&r.join("missing"), "").is_err());
        // Split into subtrees walked on threads, joined: the same list.
        assert_eq!(walk_sorted_parallel(r, "").unwrap(), reference);
        assert!(walk_sorted_parallel(&r.join("missing"), "").is_err());
        // Many subtrees, a few levels down, under a prefix.
        for i in 0..40 {
            fs::create_dir_all(r.join(format!("z/y/d{}/e{}", i % 7, i))).unwrap();
            fs::write(r.join(format!("z/y/d{}/f{}", i % 7, i)), "x").unwrap();
        }
        assert_eq!(
            walk_sorted_parallel(&r.join("z"), "p/z").unwrap(),
            walk_sorted(&r.join("z"), "p/z").unwrap()
        );
    }

    fn ctx(dir: &Path, ignore: &str) -> SourceRoot {
        SourceRoot::context(
            dir.to_path_buf(),
            IgnoreMatcher::from_file_text(ignore).unwrap(),
        )
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_listed_through_it() {
        // What the walk saw as a directory, swapped for a link to the host before the copy
        // lists it: the listing refuses the link instead of reading the host's names.
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("src")).unwrap();
        fs::write(ctx.join("src/a.txt"), "a").unwrap();
        let _held = crate::oci::at::confine(&ctx).unwrap();
        assert_eq!(names_sorted(&ctx.join("src")).unwrap(), vec!["a.txt"]);
        fs::remove_dir_all(ctx.join("src")).unwrap();
        std::os::unix::fs::symlink("/etc", ctx.join("src")).unwrap();
        assert!(names_sorted(&ctx.join("src")).is_err());
    }

    #[test]
    fn refuses_parent_escape_and_outside_symlinks() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/shadow", t.path().join("shadow")).unwrap();
        let c = ctx(t.path(), "");
        assert!(matches!(
            c.expand("../x"),
            Err(ContextError::Outside { .. })
        ));
        let e = c.expand("shadow").unwrap_err().to_string();
        assert!(
            e.contains("outside the build context") || e.contains("does not exist"),
            "{e}"
        );
        assert_eq!(c.clean("a/../b").unwrap(), "b");
    }

    #[test]
    fn globs_and_ignores() {
        let t = tempfile::tempdir().unwrap();
        for f in ["a.txt", "b.txt", "c.md", "secret.txt"] {
            fs::write(t.path().join(f), f).unwrap();
        }
        let c = ctx(t.path(), "secret.txt\n");
        let got: Vec<String> = c
            .expand("*.txt")
            .unwrap()
            .into_iter()
            .map(|s| s.rel)
            .collect();
        assert_eq!(got, vec!["a.txt", "b.txt"]);
        assert!(matches!(
            c.expand("secret.txt"),
            Err(ContextError::NotFound(_))
        ));
        assert!(segment_match("[a-b].txt", "b.txt") && !segment_match("[^a-b].txt", "b.txt"));
    }

    #[test]
    fn an_excluded_directory_is_sent_only_ahead_of_something_kept_inside() {
        let t = tempfile::tempdir().unwrap();
        for f in [
            "gone/a",
            "gone/sub/b",
            "kept/keep",
            "kept/x",
            "deep/one/two/keep",
        ] {
            let p = t.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, f).unwrap();
        }
        let everything = |c: &SourceRoot| -> Vec<String> {
            c.enumerate(&[".".to_string()], &IgnoreMatcher::default())
                .unwrap()
                .into_iter()
                .map(|(rel, _)| rel)
                .collect()
        };
        // Exceptions without wildcards: the walk enters only the directories they name.
        let c = ctx(t.path(), "gone\n!gone/keep\nkept\n!kept/keep\ndeep\n");
        assert_eq!(everything(&c), [".", "kept", "kept/keep"]);
        assert!(matches!(c.expand("gone"), Err(ContextError::NotFound(_))));
        // A wildcard in an exception: every excluded directory is entered, and a kept file
        // brings its excluded parents.
        let c = ctx(t.path(), "*\n!**/keep\n");
        assert_eq!(
            everything(&c),
            [
                ".",
                "deep",
                "deep/one",
                "deep/one/two",
                "deep/one/two/keep",
                "kept",
                "kept/keep"
            ]
        );
    }
}
