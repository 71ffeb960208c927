//! COPY and ADD as a layer tree (no staging copy: the tar is read from the sources): Docker's rules for
//! directory contents, trailing slashes, destination creation, globs, `--parents`,
//! `--exclude`, `--chown`, `--chmod`, heredoc sources, local archives (ADD) and URLs (ADD).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::context::{clean_path, IgnoreMatcher};
use crate::context::{ContextError, SourceRoot};
use crate::oci::at::SourceStat;
use crate::oci::digest::HashingWriter;
use crate::oci::tree::{LayerTree, NodeKind, TreeKey, TreeNode};
use crate::oci::unpack::{self, UnpackOptions};
use crate::plan::CopySource;

use super::users::Owner;
use crate::plan::Chmod;

/// What one COPY/ADD does, after expansion.
pub struct CopyPlan<'a> {
    pub sources: Vec<CopySource>,
    /// Absolute destination in the image.
    pub dest: String,
    /// Whether `dest` names a directory to copy into.
    pub dest_is_dir: bool,
    pub root: &'a SourceRoot,
    pub owner: Option<Owner>,
    pub chmod: Option<&'a Chmod>,
    pub parents: bool,
    pub excludes: Vec<String>,
    pub is_add: bool,
    pub unpack: Option<bool>,
    pub checksum: Option<String>,
    /// The image's root filesystem before this step (for "does the destination exist").
    pub rootfs: &'a Path,
    pub epoch: i64,
    /// Sources' `lstat`, where the step's key already took them (see `Ctx::source_stats`).
    pub known: Option<&'a HashMap<PathBuf, SourceStat>>,
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

/// The result of staging: the layer as a tree, and temporary directories its file sources
/// live in (extracted archives) that must outlive the layer writing.
pub struct Staged {
    pub tree: LayerTree,
    pub keep: Vec<tempfile::TempDir>,
    /// Sources that are not files, directories or symlinks (FIFOs, sockets, devices), with
    /// what they are: never opened, never copied, and said in a warning.
    pub skipped: Vec<String>,
    /// `ADD` URLs fetched, with the digest of what arrived.
    pub fetched: Vec<(String, String)>,
}

struct Stager<'a> {
    tree: LayerTree,
    owner: Option<Owner>,
    chmod: Option<&'a Chmod>,
    /// Directories whose metadata came from a source (others mirror the image or default).
    sourced_dirs: BTreeSet<PathBuf>,
    keep: Vec<tempfile::TempDir>,
    skipped: Vec<String>,
    /// Files with more than one name, by (device, inode): where each name went.
    linked: std::collections::BTreeMap<(u64, u64), Vec<(PathBuf, PathBuf)>>,
    /// The directory whose ancestors are known to be directories in the tree: files of one
    /// directory arrive together, and their parents need checking once.
    parents_done: Option<PathBuf>,
    /// Sources are stat'ed through their directory's handle, unless their `lstat` is known.
    files: crate::oci::at::DirCursor,
    known: Option<&'a HashMap<PathBuf, SourceStat>>,
}

fn placeholder_dir() -> TreeNode {
    TreeNode {
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Vec::new(),
    }
}

impl Stager<'_> {
    /// The layer path of an absolute image path ("" is the root, which a layer never holds).
    fn target(&self, image_path: &str) -> PathBuf {
        PathBuf::from(image_path.trim_start_matches('/').trim_end_matches('/'))
    }

    fn mode_for(&self, st: &SourceStat) -> Result<u32, CopyError> {
        let kind = st.kind();
        match self.chmod {
            Some(chmod) if kind != libc::S_IFLNK => Ok(chmod.apply(st.mode, kind == libc::S_IFDIR)),
            _ => Ok(st.mode & 0o7777),
        }
    }

    fn owner_for(&self, st: &SourceStat, keep_owner: bool) -> (u32, u32) {
        match self.owner {
            Some(o) => (o.uid, o.gid),
            None if keep_owner => (st.uid, st.gid),
            None => (0, 0),
        }
    }

    /// Make every ancestor of `rel` a directory in the tree.
    fn ensure_parents(&mut self, rel: &Path) {
        let parent = rel.parent();
        if parent.is_some() && parent == self.parents_done.as_deref() {
            return;
        }
        let mut cur = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            cur.push(c);
            let key = TreeKey::new(cur.clone());
            match self.tree.nodes.get(&key) {
                Some(n) if matches!(n.kind, NodeKind::Dir) => {}
                _ => {
                    self.tree.nodes.insert(key, placeholder_dir());
                }
            }
        }
        self.parents_done = parent.map(Path::to_path_buf);
    }

    /// Put a node in the tree; a non-directory replaces whatever was below its path.
    fn insert(&mut self, rel: PathBuf, node: TreeNode) {
        if rel.as_os_str().is_empty() {
            return;
        }
        let key = TreeKey::new(rel);
        if !matches!(node.kind, NodeKind::Dir) {
            // A non-directory replaces what was at its path and below it.
            if self
                .parents_done
                .as_ref()
                .is_some_and(|done| done.starts_with(key.as_path()))
            {
                self.parents_done = None;
            }
            // Sources arrive in order: a path beyond every one in the tree has nothing below.
            let beyond_all = self
                .tree
                .nodes
                .last_key_value()
                .is_none_or(|(last, _)| *last < key);
            if !beyond_all {
                let below: Vec<TreeKey> = self
                    .tree
                    .nodes
                    .range(key.clone()..)
                    .map(|(k, _)| k.clone())
                    .take_while(|k| k.starts_with(key.as_path()))
                    .filter(|k| *k != key)
                    .collect();
                for k in below {
                    self.tree.nodes.remove(&k);
                    self.sourced_dirs.remove(k.as_path());
                }
            }
        }
        self.ensure_parents(key.as_path());
        self.tree.nodes.insert(key, node);
    }

    fn ensure_dir(&mut self, rel: &Path) {
        if rel.as_os_str().is_empty() {
            return;
        }
        match self.tree.nodes.get(&TreeKey::new(rel)) {
            Some(n) if matches!(n.kind, NodeKind::Dir) => {}
            _ => self.insert(rel.to_path_buf(), placeholder_dir()),
        }
    }

    /// Describe one file, symlink or (recursively) directory from `src` at layer path `dst`.
    fn copy_entry(
        &mut self,
        src: &Path,
        dst: &Path,
        root: &SourceRoot,
        rel: &str,
        excludes: &IgnoreMatcher,
        sub: &str,
    ) -> Result<(), CopyError> {
        let md = match self.known.and_then(|k| k.get(src)) {
            Some(st) => *st,
            None => SourceStat::of(&self.files.lstat(src).map_err(io_at(src))?),
        };
        let keep_owner = !root.is_context;
        let kind = md.kind();
        let (uid, gid) = self.owner_for(&md, keep_owner);
        let mode = self.mode_for(&md)?;
        // dockerd's context transfer carries no extended attributes, so a COPY from the
        // context has none; files of stages and images keep theirs.
        let xattrs = if kind == libc::S_IFLNK || root.is_context {
            Vec::new()
        } else {
            crate::oci::layer::read_xattrs(src)
        };
        let node = |kind| TreeNode {
            kind,
            mode,
            uid,
            gid,
            mtime: md.mtime,
            xattrs: xattrs.clone(),
        };
        if kind == libc::S_IFDIR {
            self.insert(dst.to_path_buf(), node(NodeKind::Dir));
            self.sourced_dirs.insert(dst.to_path_buf());
            for n in crate::context::names_sorted(src)? {
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
        } else if kind == libc::S_IFLNK {
            let target = fs::read_link(src).map_err(io_at(src))?;
            self.insert(dst.to_path_buf(), node(NodeKind::Symlink(target)));
        } else if kind == libc::S_IFREG {
            if md.nlink > 1 {
                self.linked
                    .entry((md.dev, md.ino))
                    .or_default()
                    .push((dst.to_path_buf(), src.to_path_buf()));
            }
            self.insert(
                dst.to_path_buf(),
                node(NodeKind::File {
                    source: src.to_path_buf(),
                    size: md.size,
                    content: md.content,
                }),
            );
        } else {
            // Devices, sockets and FIFOs are not copied (opening a FIFO would block).
            let kind = if kind == libc::S_IFIFO {
                "a FIFO"
            } else if kind == libc::S_IFSOCK {
                "a socket"
            } else {
                "a device"
            };
            self.skipped.push(format!("{} ({})", rel, kind));
        }
        Ok(())
    }

    /// Names of one file stay one file, as BuildKit copies them: in each group the first
    /// name in the layer's order keeps the bytes and the others become hard links to it.
    fn link_groups(&mut self) {
        for names in std::mem::take(&mut self.linked).into_values() {
            let mut present: Vec<PathBuf> = names
                .into_iter()
                .filter(|(dst, src)| {
                    matches!(self.tree.nodes.get(&TreeKey::new(dst.clone())),
                        Some(TreeNode { kind: NodeKind::File { source, .. }, .. }) if source == src)
                })
                .map(|(dst, _)| dst)
                .collect();
            present.sort();
            present.dedup();
            let Some((first, rest)) = present.split_first() else {
                continue;
            };
            for name in rest {
                if let Some(node) = self.tree.nodes.get_mut(&TreeKey::new(name.clone())) {
                    node.kind = NodeKind::HardLink(first.clone());
                }
            }
        }
    }

    /// A file whose bytes are read from `source` when the layer is written.
    fn add_file(&mut self, dst: &Path, source: PathBuf, size: u64, mode: u32, mtime: i64) {
        self.insert_file(
            dst,
            NodeKind::File {
                source,
                size,
                content: None,
            },
            mode,
            mtime,
        );
    }

    fn write_file(
        &mut self,
        dst: &Path,
        data: &[u8],
        mode: u32,
        mtime: i64,
    ) -> Result<(), CopyError> {
        self.insert_file(dst, NodeKind::Data(data.to_vec()), mode, mtime);
        Ok(())
    }

    /// A file node owned by the step's --chown owner (root by default).
    fn insert_file(&mut self, dst: &Path, kind: NodeKind, mode: u32, mtime: i64) {
        let (uid, gid) = self.owner.map(|o| (o.uid, o.gid)).unwrap_or((0, 0));
        self.insert(
            dst.to_path_buf(),
            TreeNode {
                kind,
                mode,
                uid,
                gid,
                mtime,
                xattrs: Vec::new(),
            },
        );
    }

    /// Give every directory no source provided the metadata the image already has for it
    /// (so the layer does not change it), or 0755 root (the owner for the destination) for
    /// new ones.
    fn settle_dirs(&mut self, rootfs: &Path, epoch: i64) -> Result<(), CopyError> {
        let owner = self.owner;
        let sourced = self.sourced_dirs.clone();
        for (rel, node) in self.tree.nodes.iter_mut() {
            if !matches!(node.kind, NodeKind::Dir) || sourced.contains(rel.as_path()) {
                continue;
            }
            let existing = unpack::resolve_in_root(rootfs, rel)
                .ok()
                .and_then(|p| fs::metadata(p).ok())
                .filter(|m| m.is_dir());
            match existing {
                Some(md) => {
                    node.mode = md.mode() & 0o7777;
                    node.uid = md.uid();
                    node.gid = md.gid();
                    node.mtime = md.mtime();
                }
                None => {
                    // Directories the step creates belong to its owner (--chown, or USER for
                    // WORKDIR), as BuildKit creates them.
                    node.mode = 0o755;
                    let (uid, gid) = owner.map(|o| (o.uid, o.gid)).unwrap_or((0, 0));
                    node.uid = uid;
                    node.gid = gid;
                    node.mtime = epoch;
                }
            }
        }
        Ok(())
    }
}

/// What a COPY's destination is at the point a source is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Missing,
    Dir,
    File,
}

impl Dest {
    /// Where a file named `name` goes, and what the destination is afterwards.
    fn file_target(&mut self, dest: &str, name: &str) -> String {
        match self {
            Dest::Dir => format!("{}/{}", dest.trim_end_matches('/'), name),
            _ => {
                *self = Dest::File;
                dest.to_string()
            }
        }
    }
}

/// `dest` (absolute) with the symlinks of `rootfs` along it followed.
fn resolve_dest(rootfs: &Path, dest: &str) -> String {
    let rel = dest.trim_start_matches('/').trim_end_matches('/');
    if rel.is_empty() {
        return dest.to_string();
    }
    let resolved = match unpack::resolve_in_root(rootfs, Path::new(rel)) {
        Ok(p) => p,
        Err(_) => return dest.to_string(),
    };
    let Ok(inside) = resolved.strip_prefix(rootfs) else {
        return dest.to_string();
    };
    format!("/{}", inside.to_string_lossy())
}

/// Describe the layer of one COPY/ADD (or WORKDIR) as a tree.
pub fn stage(plan: &CopyPlan) -> Result<Staged, CopyError> {
    let excludes = IgnoreMatcher::new(&plan.excludes)
        .map_err(|e| CopyError::Other(format!("--exclude: {}", e)))?;
    let mut st = Stager {
        tree: LayerTree::default(),
        owner: plan.owner,
        chmod: plan.chmod,
        sourced_dirs: BTreeSet::new(),
        keep: Vec::new(),
        skipped: Vec::new(),
        linked: Default::default(),
        parents_done: None,
        files: Default::default(),
        known: plan.known,
    };
    // The destination resolves through symlinks of the image, as BuildKit's does: `/link/x`
    // with `/link -> target` writes `/target/x`, and the link stays.
    let dest_abs = resolve_dest(plan.rootfs, &plan.dest);
    let dest_trailing = plan.dest_is_dir || dest_abs == "/";
    // As BuildKit copies each match in turn: into the destination when it ends in `/` or is
    // a directory by then (an earlier directory source made it one), else onto it as a file
    // (a later file replaces an earlier one).
    let existing =
        unpack::resolve_in_root(plan.rootfs, Path::new(dest_abs.trim_start_matches('/')))
            .ok()
            .and_then(|p| fs::metadata(p).ok());
    let mut dest = match existing {
        _ if dest_trailing => Dest::Dir,
        Some(md) if md.is_dir() => Dest::Dir,
        Some(_) => Dest::File,
        None => Dest::Missing,
    };
    let join = |base: &str, name: &str| format!("{}/{}", base.trim_end_matches('/'), name);
    if plan.sources.is_empty() {
        // WORKDIR: just the directory.
        let d = st.target(&dest_abs);
        st.ensure_dir(&d);
    }

    let mut fetched = Vec::new();
    for source in &plan.sources {
        let src = match source {
            // Heredoc source: `COPY <<EOF /dest`.
            CopySource::Heredoc { name, content } => {
                let target = dest.file_target(&dest_abs, name);
                let mode = plan.chmod.map_or(0o644, |c| c.apply(0o644, false));
                st.write_file(&st.target(&target), content.as_bytes(), mode, plan.epoch)?;
                continue;
            }
            CopySource::Url(url) => {
                let tmp = tempfile::tempdir()
                    .map_err(|e| CopyError::Other(format!("temporary directory: {}", e)))?;
                let (name, body, size, digest) =
                    fetch_url(url, plan.checksum.as_deref(), tmp.path())?;
                fetched.push((url.clone(), digest));
                let target = dest.file_target(&dest_abs, &name);
                let mode = plan.chmod.map_or(0o600, |c| c.apply(0o600, false));
                st.add_file(&st.target(&target), body, size, mode, plan.epoch);
                st.keep.push(tmp);
                continue;
            }
            CopySource::Path(p) => p,
            CopySource::Git(url) => {
                return Err(CopyError::Other(format!(
                    "internal: {} is staged before it is checked out",
                    url
                )))
            }
        };
        if plan.checksum.is_some() {
            return Err(CopyError::Other(
                "--checksum applies to URL sources only".into(),
            ));
        }
        // --parents keeps each match's path; a `/./` in the source marks where the kept part
        // starts (`./x/./y/a.txt` keeps `y/a.txt`).
        let pivot: Option<String> = plan
            .parents
            .then(|| src.find("/./"))
            .flatten()
            .map(|i| {
                clean_path(&format!("/{}", &src[..i]))
                    .trim_start_matches('/')
                    .to_string()
            })
            .filter(|p| !p.is_empty());
        let kept = |rel: &str| -> String {
            match &pivot {
                Some(p) if rel == p => ".".to_string(),
                Some(p) => rel
                    .strip_prefix(&format!("{}/", p))
                    .unwrap_or(rel)
                    .to_string(),
                None => rel.to_string(),
            }
        };
        for m in plan.root.expand(src)? {
            let md = fs::metadata(&m.path).map_err(io_at(&m.path))?;
            let base_name = Path::new(&m.rel)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if md.is_dir() {
                if dest == Dest::File && !plan.parents {
                    return Err(CopyError::Other(format!(
                        "cannot copy the directory {} to {}: it is not a directory",
                        m.rel, plan.dest
                    )));
                }
                dest = Dest::Dir;
                let target = if plan.parents && kept(&m.rel) != "." {
                    join(&dest_abs, &kept(&m.rel))
                } else {
                    dest_abs.clone()
                };
                let t = st.target(&target);
                st.ensure_dir(&t);
                for n in crate::context::names_sorted(&m.path)? {
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
                dest = Dest::Dir;
                // Extract (safely) to a private directory, then describe what came out.
                let t = st.target(&dest_abs);
                st.ensure_dir(&t);
                let tmp = tempfile::tempdir()
                    .map_err(|e| CopyError::Other(format!("temporary directory: {}", e)))?;
                let opts = UnpackOptions {
                    devices: false,
                    ownership: nix::unistd::geteuid().is_root(),
                    overlay_format: false,
                    metadata_only: false,
                    user_xattrs: false,
                    capability_xattr_only: true,
                };
                unpack::unpack_layer(&m.path, &m.rel, tmp.path(), opts)
                    .map_err(|e| CopyError::Other(e.to_string()))?;
                let extracted = SourceRoot::image(tmp.path().to_path_buf());
                let mut names: Vec<_> = fs::read_dir(tmp.path())
                    .map_err(io_at(tmp.path()))?
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                names.sort();
                // An archive's entries keep the owners it gives them: docker applies
                // --chown to copied files, not to what an archive unpacks.
                let owner = st.owner.take();
                for n in names {
                    let name = n.to_string_lossy().into_owned();
                    st.copy_entry(
                        &tmp.path().join(&n),
                        &t.join(&n),
                        &extracted,
                        &name,
                        &IgnoreMatcher::default(),
                        &name,
                    )?;
                }
                st.owner = owner;
                st.keep.push(tmp);
                continue;
            }
            let target = if plan.parents {
                st.target(&join(&dest_abs, &kept(&m.rel)))
            } else {
                let shown = dest.file_target(&dest_abs, &base_name);
                // Into a directory under the source's own name, its bytes as they are.
                match (&dest, m.exact.file_name()) {
                    (Dest::Dir, Some(name)) => st.target(&dest_abs).join(name),
                    _ => st.target(&shown),
                }
            };
            st.copy_entry(&m.path, &target, plan.root, &m.rel, &excludes, &base_name)?;
        }
    }
    st.link_groups();
    st.settle_dirs(plan.rootfs, plan.epoch)?;
    Ok(Staged {
        tree: st.tree,
        keep: st.keep,
        skipped: st.skipped,
        fetched,
    })
}

/// Download a URL for ADD into a file of `dir`, hashing as it streams and verifying
/// `--checksum` (`sha256:<hex>`) when given. Returns the file's name for a directory
/// destination, its path, its size and its digest.
fn fetch_url(
    url: &str,
    checksum: Option<&str>,
    dir: &Path,
) -> Result<(String, PathBuf, u64, String), CopyError> {
    download(url, checksum, dir, "ADD").map_err(CopyError::Other)
}

/// Download `url` into `dir/body` for `what` (the instruction or flag, for messages),
/// hashing as it streams and verifying `checksum` (`sha256:<hex>`) when given. Returns the
/// URL's file name, the file, its size and its digest.
pub(crate) fn download(
    url: &str,
    checksum: Option<&str>,
    dir: &Path,
    what: &str,
) -> Result<(String, PathBuf, u64, String), String> {
    let fail = |e: String| format!("{} {}: {}", what, url, e);
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(300))
        .build();
    let resp =
        crate::registry::redirect::get(&agent, url).map_err(|e| format!("{} {}", what, e))?;
    if resp.status() >= 400 {
        return Err(fail(format!(
            "the server answered {} {}",
            resp.status(),
            resp.status_text()
        )));
    }
    let file_path = dir.join("body");
    let file = fs::File::create(&file_path)
        .map_err(|e| fail(format!("{}: {}", file_path.display(), e)))?;
    let mut w = HashingWriter::new(io::BufWriter::new(file));
    io::copy(&mut resp.into_reader(), &mut w).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            fail(format!(
                "no space left on the file system of {}",
                dir.display()
            ))
        } else {
            fail(e.to_string())
        }
    })?;
    let (got, size, mut inner) = w.finish();
    inner
        .flush()
        .map_err(|e| fail(format!("{}: {}", file_path.display(), e)))?;
    if let Some(want) = checksum {
        if got.to_string() != want {
            return Err(fail(format!(
                "checksum mismatch: expected {}, got {}",
                want, got
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
    Ok((name, file_path, size, got.to_string()))
}
