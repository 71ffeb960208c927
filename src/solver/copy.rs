//! COPY and ADD into a staging directory that becomes the step's layer: Docker's rules for
//! directory contents, trailing slashes, destination creation, globs, `--parents`,
//! `--exclude`, `--chown`, `--chmod`, heredoc sources, local archives (ADD) and URLs (ADD).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::context::{ContextError, SourceRoot};
use crate::oci::digest::HashingWriter;
use crate::oci::unpack::{self, set_mtime, UnpackOptions};
use crate::syntax::dockerignore::IgnoreMatcher;
use crate::syntax::parser::Heredoc;

use super::users::{apply_chmod, Owner};

/// What one COPY/ADD does, after expansion.
pub struct CopyPlan<'a> {
    pub sources: Vec<String>,
    /// Absolute destination in the image (trailing `/` kept).
    pub dest: String,
    pub root: &'a SourceRoot,
    pub owner: Option<Owner>,
    pub chmod: Option<String>,
    pub parents: bool,
    pub excludes: Vec<String>,
    pub heredocs: &'a [Heredoc],
    pub is_add: bool,
    pub unpack: Option<bool>,
    pub checksum: Option<String>,
    /// The image's root filesystem before this step (for "does the destination exist").
    pub rootfs: &'a Path,
    pub epoch: i64,
    /// Expands heredoc bodies whose delimiter was not quoted.
    pub expand_heredoc: &'a dyn Fn(&str) -> Result<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Other(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

struct Stager<'a> {
    staging: &'a Path,
    owner: Option<Owner>,
    chmod: Option<&'a str>,
    /// Directories whose metadata came from a source (others mirror the image or default).
    sourced_dirs: BTreeSet<PathBuf>,
    dir_times: Vec<(PathBuf, i64)>,
}

impl Stager<'_> {
    fn target(&self, image_path: &str) -> PathBuf {
        self.staging.join(image_path.trim_start_matches('/'))
    }

    fn apply_meta(&self, p: &Path, md: &fs::Metadata, keep_owner: bool) -> Result<(), CopyError> {
        let ft = md.file_type();
        if !ft.is_symlink() {
            let mode = match self.chmod {
                Some(spec) => {
                    apply_chmod(spec, md.mode(), ft.is_dir()).map_err(CopyError::Other)?
                }
                None => md.mode() & 0o7777,
            };
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io_at(p))?;
        }
        let (uid, gid) = match self.owner {
            Some(o) => (o.uid, o.gid),
            None if keep_owner => (md.uid(), md.gid()),
            None => (0, 0),
        };
        let _ = nix::unistd::fchownat(
            None,
            p,
            Some(uid.into()),
            Some(gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        Ok(())
    }

    /// Copy one file, symlink or (recursively) directory from `src` to staged `dst`.
    fn copy_entry(
        &mut self,
        src: &Path,
        dst: &Path,
        root: &SourceRoot,
        rel: &str,
        excludes: &IgnoreMatcher,
        sub: &str,
    ) -> Result<(), CopyError> {
        let md = fs::symlink_metadata(src).map_err(io_at(src))?;
        let keep_owner = !root.is_context;
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        let ft = md.file_type();
        if ft.is_dir() {
            if !dst.is_dir() {
                if fs::symlink_metadata(dst).is_ok() {
                    fs::remove_file(dst).map_err(io_at(dst))?;
                }
                fs::create_dir(dst).map_err(io_at(dst))?;
            }
            let mut names: Vec<_> = fs::read_dir(src)
                .map_err(io_at(src))?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.sort();
            for n in names {
                let child_rel = if rel == "." {
                    n.to_string_lossy().into_owned()
                } else {
                    format!("{}/{}", rel, n.to_string_lossy())
                };
                let child_sub = if sub.is_empty() {
                    n.to_string_lossy().into_owned()
                } else {
                    format!("{}/{}", sub, n.to_string_lossy())
                };
                if root.excluded(&child_rel)
                    || (!excludes.is_empty() && excludes.is_ignored(&child_sub))
                {
                    continue;
                }
                self.copy_entry(
                    &src.join(&n),
                    &dst.join(&n),
                    root,
                    &child_rel,
                    excludes,
                    &child_sub,
                )?;
            }
            self.apply_meta(dst, &md, keep_owner)?;
            self.sourced_dirs.insert(dst.to_path_buf());
            self.dir_times.push((dst.to_path_buf(), md.mtime()));
            return Ok(());
        }
        if fs::symlink_metadata(dst).is_ok() {
            if dst.is_dir() && !ft.is_symlink() {
                fs::remove_dir_all(dst).map_err(io_at(dst))?;
            } else {
                let _ = fs::remove_file(dst);
            }
        }
        if ft.is_symlink() {
            let target = fs::read_link(src).map_err(io_at(src))?;
            symlink(&target, dst).map_err(io_at(dst))?;
        } else if ft.is_file() {
            let mut from = fs::File::open(src).map_err(io_at(src))?;
            let mut to = fs::File::create(dst).map_err(io_at(dst))?;
            io::copy(&mut from, &mut to).map_err(io_at(dst))?;
        } else {
            return Ok(()); // devices, sockets and fifos in a context are not copied
        }
        self.apply_meta(dst, &md, keep_owner)?;
        set_mtime(dst, md.mtime());
        Ok(())
    }

    fn write_file(
        &mut self,
        dst: &Path,
        data: &[u8],
        mode: u32,
        mtime: i64,
    ) -> Result<(), CopyError> {
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        fs::write(dst, data).map_err(io_at(dst))?;
        let md = fs::symlink_metadata(dst).map_err(io_at(dst))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(mode)).map_err(io_at(dst))?;
        let md2 = fs::symlink_metadata(dst).map_err(io_at(dst))?;
        let _ = md;
        self.apply_meta(dst, &md2, false)?;
        set_mtime(dst, mtime);
        Ok(())
    }

    /// Give every staged directory that no source provided the metadata the image already
    /// has for it (so the layer does not change it), or 0755 root for new ones.
    fn settle_dirs(
        &self,
        rootfs: &Path,
        dest_dir: Option<&Path>,
        epoch: i64,
    ) -> Result<(), CopyError> {
        let mut dirs = Vec::new();
        for e in walkdir::WalkDir::new(self.staging).min_depth(1) {
            let e = e.map_err(|e| CopyError::Other(e.to_string()))?;
            if e.file_type().is_dir() {
                dirs.push(e.path().to_path_buf());
            }
        }
        for d in dirs.iter().rev() {
            let rel = d.strip_prefix(self.staging).unwrap_or(d);
            if self.sourced_dirs.contains(d) {
                continue;
            }
            let existing = unpack::resolve_in_root(rootfs, rel)
                .ok()
                .and_then(|p| fs::metadata(p).ok())
                .filter(|m| m.is_dir());
            match existing {
                Some(md) => {
                    fs::set_permissions(d, fs::Permissions::from_mode(md.mode() & 0o7777))
                        .map_err(io_at(d))?;
                    let _ = nix::unistd::chown(d, Some(md.uid().into()), Some(md.gid().into()));
                    set_mtime(d, md.mtime());
                }
                None => {
                    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io_at(d))?;
                    let (uid, gid) = match (self.owner, Some(d.as_path()) == dest_dir) {
                        (Some(o), true) => (o.uid, o.gid),
                        _ => (0, 0),
                    };
                    let _ = nix::unistd::chown(d, Some(uid.into()), Some(gid.into()));
                    set_mtime(d, epoch);
                }
            }
        }
        for (d, t) in self.dir_times.iter().rev() {
            set_mtime(d, *t);
        }
        Ok(())
    }
}

/// Stage the files of one COPY/ADD under `staging`.
pub fn stage(plan: &CopyPlan, staging: &Path) -> Result<(), CopyError> {
    let excludes = IgnoreMatcher::new(&plan.excludes)
        .map_err(|e| CopyError::Other(format!("--exclude: {}", e)))?;
    let mut st = Stager {
        staging,
        owner: plan.owner,
        chmod: plan.chmod.as_deref(),
        sourced_dirs: BTreeSet::new(),
        dir_times: Vec::new(),
    };
    let dest_abs = plan.dest.clone();
    let dest_trailing = dest_abs.ends_with('/') || dest_abs.ends_with("/.") || dest_abs == "/";
    let any_glob = plan.sources.iter().any(|s| s.contains(['*', '?', '[']));
    let dest_exists_dir =
        unpack::resolve_in_root(plan.rootfs, Path::new(dest_abs.trim_start_matches('/')))
            .map(|p| p.is_dir())
            .unwrap_or(false);
    let dest_is_dir = dest_trailing || plan.sources.len() > 1 || any_glob || dest_exists_dir;
    let dest_dir_path = st.target(&dest_abs);
    let join = |base: &str, name: &str| format!("{}/{}", base.trim_end_matches('/'), name);

    for src in &plan.sources {
        // Heredoc source: `COPY <<EOF /dest`.
        let heredoc_name = crate::syntax::parser::parse_heredoc_word(src).map(|(name, ..)| name);
        if let Some(doc) = heredoc_name.and_then(|n| plan.heredocs.iter().find(|h| h.name == n)) {
            let body = if doc.expand {
                (plan.expand_heredoc)(&doc.content).map_err(CopyError::Other)?
            } else {
                doc.content.clone()
            };
            let target = if dest_is_dir {
                join(&dest_abs, &doc.name)
            } else {
                dest_abs.clone()
            };
            let mode = match &plan.chmod {
                Some(c) => apply_chmod(c, 0o644, false).map_err(CopyError::Other)?,
                None => 0o644,
            };
            st.write_file(&st.target(&target), body.as_bytes(), mode, plan.epoch)?;
            continue;
        }
        if plan.is_add && is_url(src) {
            let (name, data) = fetch_url(src, plan.checksum.as_deref())?;
            let target = if dest_is_dir {
                join(&dest_abs, &name)
            } else {
                dest_abs.clone()
            };
            let mode = match &plan.chmod {
                Some(c) => apply_chmod(c, 0o600, false).map_err(CopyError::Other)?,
                None => 0o600,
            };
            st.write_file(&st.target(&target), &data, mode, plan.epoch)?;
            continue;
        }
        if plan.checksum.is_some() {
            return Err(CopyError::Other(
                "--checksum applies to URL sources only".into(),
            ));
        }
        for m in plan.root.expand(src)? {
            let md = fs::metadata(&m.path).map_err(io_at(&m.path))?;
            let base_name = Path::new(&m.rel)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if md.is_dir() {
                let target = if plan.parents && m.rel != "." {
                    join(&dest_abs, &m.rel)
                } else {
                    dest_abs.clone()
                };
                let t = st.target(&target);
                fs::create_dir_all(&t).map_err(io_at(&t))?;
                let mut names: Vec<_> = fs::read_dir(&m.path)
                    .map_err(io_at(&m.path))?
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                names.sort();
                for n in names {
                    let child_rel = if m.rel == "." {
                        n.to_string_lossy().into_owned()
                    } else {
                        format!("{}/{}", m.rel, n.to_string_lossy())
                    };
                    let sub = n.to_string_lossy().into_owned();
                    if plan.root.excluded(&child_rel)
                        || (!excludes.is_empty() && excludes.is_ignored(&sub))
                    {
                        continue;
                    }
                    st.copy_entry(
                        &m.path.join(&n),
                        &t.join(&n),
                        plan.root,
                        &child_rel,
                        &excludes,
                        &sub,
                    )?;
                }
                continue;
            }
            if !excludes.is_empty() && excludes.is_ignored(&m.rel) {
                continue;
            }
            let unpack_it =
                plan.is_add && plan.unpack != Some(false) && unpack::is_archive(&m.path);
            if unpack_it {
                let t = st.target(&dest_abs);
                fs::create_dir_all(&t).map_err(io_at(&t))?;
                let opts = UnpackOptions {
                    devices: false,
                    ownership: nix::unistd::geteuid().is_root(),
                    overlay_format: false,
                };
                unpack::unpack_layer(&m.path, &m.rel, &t, opts)
                    .map_err(|e| CopyError::Other(e.to_string()))?;
                mark_sourced(&t, &mut st.sourced_dirs);
                continue;
            }
            let target = if plan.parents {
                join(&dest_abs, &m.rel)
            } else if dest_is_dir {
                join(&dest_abs, &base_name)
            } else {
                dest_abs.clone()
            };
            st.copy_entry(
                &m.path,
                &st.target(&target),
                plan.root,
                &m.rel,
                &excludes,
                &base_name,
            )?;
        }
    }
    st.settle_dirs(
        plan.rootfs,
        if dest_is_dir {
            Some(&dest_dir_path)
        } else {
            None
        },
        plan.epoch,
    )
}

fn mark_sourced(dir: &Path, set: &mut BTreeSet<PathBuf>) {
    for e in walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .flatten()
    {
        if e.file_type().is_dir() {
            set.insert(e.path().to_path_buf());
        }
    }
}

/// Download a URL for ADD, verifying `--checksum` (`sha256:<hex>`) when given.
fn fetch_url(url: &str, checksum: Option<&str>) -> Result<(String, Vec<u8>), CopyError> {
    let resp = ureq::get(url)
        .call()
        .map_err(|e| CopyError::Other(format!("ADD {}: {}", url, e)))?;
    let mut data = Vec::new();
    resp.into_reader()
        .take(8 << 30)
        .read_to_end(&mut data)
        .map_err(|e| CopyError::Other(format!("ADD {}: {}", url, e)))?;
    if let Some(want) = checksum {
        let mut h = HashingWriter::new(io::sink());
        let _ = h.write_all(&data);
        let (got, _, _) = h.finish();
        if got.to_string() != want {
            return Err(CopyError::Other(format!(
                "ADD {}: checksum mismatch: expected {}, got {}",
                url, want, got
            )));
        }
    }
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("index.html")
        .to_string();
    Ok((name, data))
}
