//! `--isolation container`: the container builder runs in *is* the sandbox, as with Kaniko.
//! No mount, no namespace and no capability beyond Docker's defaults is needed.
//!
//! A step runs in place: the stage's root filesystem (the copy snapshotter's private view)
//! is laid out in the container's own `/`, the command runs there as the step's user, and
//! what it changed is captured by comparing `/` with what was laid out, into the same
//! overlay-style diff directory an overlay upper directory gives (new and changed entries
//! with their parents, 0/0 character devices for deletions, an opaque marker for a directory
//! that was replaced). So the layer, and the image digest, are a host build's.
//!
//! What is never laid out, compared or deleted ("kept"): every mount point of the container
//! (/proc, /sys, /dev, /etc/hosts, volumes, Kubernetes' secrets), /etc/resolv.conf,
//! /etc/hosts and /etc/hostname, builder's own executable, store, context and outputs.
//! RUN --mount sources are copied (or, for caches, moved) to their targets for the step and
//! taken away after it, so a secret never stays in `/`.
//!
//! The layout is remembered between steps as a stat cache: for every path, the view
//! entry it was copied from and what was placed. An unchanged entry costs two `lstat`s, and
//! a change is seen by its inode and ctime (which a step cannot forge), not by mtime.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use super::sandbox::{Exit, ExtraMount, NetworkMode, RunSpec, SandboxError};
use super::{copy_meta, copy_tree, io_at, WorkerError};

/// The documented override for a container builder cannot recognise.
pub const FORCE_ENV: &str = "BUILDER_CONTAINER_ISOLATION_FORCE";

/// Why this looks like a container, or `None` on what may be a host.
pub fn detect_container() -> Option<String> {
    if Path::new("/.dockerenv").exists() {
        return Some("a Docker container (/.dockerenv)".into());
    }
    if Path::new("/run/.containerenv").exists() {
        return Some("a Podman container (/run/.containerenv)".into());
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || Path::new("/var/run/secrets/kubernetes.io/serviceaccount").exists()
    {
        return Some("a Kubernetes pod".into());
    }
    if let Some(c) = std::env::var_os("container").filter(|c| !c.is_empty()) {
        return Some(format!("a container (container={})", c.to_string_lossy()));
    }
    None
}

/// The paths a layout never touches, absolute and normalized.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    paths: Vec<PathBuf>,
    /// The same, relative to `/`: a walk from `/` that skips each of them as it meets it
    /// never goes below one, so an exact lookup is enough there.
    exact: HashSet<PathBuf>,
    /// Every directory on the way to a kept path, relative to `/`.
    ancestors: HashSet<PathBuf>,
}

/// The system directories builder's binary may sit in: only the file itself is kept there,
/// not the image's whole directory.
const SHARED_BIN_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
];

impl Kept {
    /// Every mount point of the container, the network files, builder's executable (and its
    /// directory, unless a shared one) and `extra` (store, context, outputs).
    pub fn discover(extra: &[PathBuf]) -> Kept {
        let mut paths: Vec<PathBuf> = ["/proc", "/sys", "/dev"]
            .into_iter()
            .chain(["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"])
            .map(PathBuf::from)
            .collect();
        if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
            for line in info.lines() {
                if let Some(point) = line.split(' ').nth(4) {
                    let p = PathBuf::from(unescape_mountinfo(point));
                    if p != Path::new("/") {
                        paths.push(p);
                    }
                }
            }
        }
        if let Ok(exe) = std::env::current_exe() {
            match exe.parent() {
                Some(dir) if !SHARED_BIN_DIRS.iter().any(|d| Path::new(d) == dir) => {
                    paths.push(dir.to_path_buf())
                }
                _ => paths.push(exe.clone()),
            }
        }
        for p in extra {
            let abs = if p.is_absolute() {
                p.clone()
            } else {
                std::env::current_dir().unwrap_or_default().join(p)
            };
            paths.push(fs::canonicalize(&abs).unwrap_or_else(|_| normalize(&abs)));
        }
        if let Some(more) = std::env::var_os("BUILDER_KEEP_PATHS") {
            paths.extend(std::env::split_paths(&more).filter(|p| p.is_absolute()));
        }
        Kept::of(paths.iter().map(|p| normalize(p)).collect())
    }

    fn of(mut paths: Vec<PathBuf>) -> Kept {
        paths.sort();
        paths.dedup();
        let rel = |p: &Path| p.strip_prefix("/").unwrap_or(p).to_path_buf();
        let exact = paths.iter().map(|p| rel(p)).collect();
        let ancestors = paths
            .iter()
            .flat_map(|p| p.ancestors().skip(1).map(rel).collect::<Vec<_>>())
            .filter(|a| !a.as_os_str().is_empty())
            .collect();
        Kept {
            paths,
            exact,
            ancestors,
        }
    }

    /// Also keep `more` (absolute image paths).
    fn with(&self, more: &[PathBuf]) -> Kept {
        let mut paths = self.paths.clone();
        paths.extend(more.iter().map(|p| normalize(p)));
        Kept::of(paths)
    }

    /// Whether a walk from `/` that skips what is kept must skip `rel` (relative to `/`).
    fn met(&self, rel: &Path) -> bool {
        self.exact.contains(rel)
    }

    /// Whether `rel` (relative to `/`) is kept or lies under a kept path.
    fn covers(&self, rel: &Path) -> bool {
        rel.ancestors().any(|a| self.exact.contains(a))
    }

    /// Whether `rel` is a directory on the way to a kept path (which must stay).
    fn leads_to_kept(&self, rel: &Path) -> bool {
        self.ancestors.contains(rel)
    }
}

/// `/proc`, `/dev`, `/sys` or below: the container's own, never a step's.
fn is_special(rel: &Path) -> bool {
    rel.components()
        .next()
        .is_some_and(|c| ["proc", "dev", "sys"].iter().any(|s| c.as_os_str() == *s))
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `.` and `..` resolved lexically.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// What identifies an entry's state: a change to content, metadata or identity changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sig {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// A directory's birth time: a directory removed and made again may get the same inode
    /// number back at once, never the same birth time.
    born: Option<(i64, u32)>,
}

/// When `p` was created, where the file system records it (`statx`).
pub(crate) fn birth_time(p: &Path) -> Option<(i64, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes the struct it is given; the path is NUL-terminated.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BTIME,
            &mut st,
        )
    };
    (r == 0 && st.stx_mask & libc::STATX_BTIME != 0)
        .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec))
}

impl Sig {
    /// The signature of the entry at `p`, whose `lstat` is `md`.
    fn at(p: &Path, md: &fs::Metadata) -> Sig {
        Sig {
            born: if md.is_dir() { birth_time(p) } else { None },
            ..Sig::of(md)
        }
    }

    fn of(md: &fs::Metadata) -> Sig {
        Sig {
            born: None,
            dev: md.dev(),
            ino: md.ino(),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }

    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// One laid-out path: the view entry it came from, and what was placed in `/`.
#[derive(Debug, Clone, Copy)]
struct Laid {
    source: Sig,
    placed: Sig,
}

/// What is laid out in `/` now.
#[derive(Default)]
struct Layout {
    entries: HashMap<PathBuf, Laid>,
    /// After a step whose layer is all that will change its view: that view, the layer
    /// count it will then have, and the paths the step changed (the only ones where `/` and
    /// the view can then differ). The next step of the stage re-lays out only those.
    pending: Option<Pending>,
}

struct Pending {
    view: PathBuf,
    layers: usize,
    changed: Captured,
}

/// What a layout had to leave out, said once per build through the solver's reporter
/// ([`take_notices`]).
static NOTICES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static NOTICED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn notice_once(msg: String) {
    let mut said = NOTICED.lock().unwrap_or_else(|e| e.into_inner());
    if said.get_or_insert_with(HashSet::new).insert(msg.clone()) {
        NOTICES.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
    }
}

/// The notices layouts made since the last call.
pub fn take_notices() -> Vec<String> {
    std::mem::take(&mut *NOTICES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// One `/`: steps run one at a time, and the layout outlives each.
static LAYOUT: Mutex<Option<Layout>> = Mutex::new(None);

fn remove_any(p: &Path) -> Result<(), WorkerError> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p).map_err(io_at(p)),
        Ok(_) => fs::remove_file(p).map_err(io_at(p)),
        Err(_) => Ok(()),
    }
}

fn walk_err(root: &Path) -> impl Fn(walkdir::Error) -> WorkerError + '_ {
    move |e| WorkerError::Io {
        path: e.path().unwrap_or(root).to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn set_times(p: &Path, md: &fs::Metadata) {
    let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    let _ = nix::sys::stat::utimensat(
        None,
        p,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

/// Make `root` show exactly `view` (outside what is kept), reusing what is already there.
fn lay_out(
    view: &Path,
    layers: usize,
    root: &Path,
    kept: &Kept,
    layout: &mut Layout,
) -> Result<(), WorkerError> {
    if let Some(p) = layout.pending.take() {
        if p.view == view
            && p.layers == layers
            && lay_out_paths(view, root, kept, layout, p.changed)?
        {
            return Ok(());
        }
    }
    lay_out_all(view, root, kept, layout)
}

/// Put the view's entry `src` (of metadata `md`) at `dst`, replacing what is there
/// (`current`): a directory made or kept, with the entry's owner and mode (its times are set
/// by the caller, after its contents); a file linked to the view's own, not copied (what a
/// step changes in place is seen by its ctime and captured into the layer, which is then
/// applied to the view, so the view ends as it would anyway), or copied where the store is on
/// another file system; a symlink, FIFO or device node made again.
fn place_entry(
    src: &Path,
    dst: &Path,
    md: &fs::Metadata,
    current: Option<&fs::Metadata>,
) -> Result<(), WorkerError> {
    if md.is_dir() {
        match current {
            Some(cur) if cur.is_dir() => {}
            Some(_) => {
                remove_any(dst)?;
                fs::create_dir(dst).map_err(io_at(dst))?;
            }
            None => fs::create_dir(dst).map_err(io_at(dst))?,
        }
        copy_meta(src, dst, md);
        return Ok(());
    }
    if current.is_some() {
        remove_any(dst)?;
    }
    if md.is_file() {
        if fs::hard_link(src, dst).is_err() {
            fs::copy(src, dst).map_err(io_at(dst))?;
            copy_meta(src, dst, md);
        }
        return Ok(());
    }
    if md.file_type().is_symlink() {
        symlink(fs::read_link(src).map_err(io_at(src))?, dst).map_err(io_at(dst))?;
    } else {
        super::make_node(dst, md)?;
    }
    copy_meta(src, dst, md);
    Ok(())
}

/// Re-lay out only `paths` (and their parents), where `/` and the view may differ after the
/// last step. `Ok(false)` when that cannot be done by links (the full layout then runs).
fn lay_out_paths(
    view: &Path,
    root: &Path,
    kept: &Kept,
    layout: &mut Layout,
    changed: Captured,
) -> Result<bool, WorkerError> {
    for r in &changed.remade {
        layout.entries.retain(|k, _| !(k.starts_with(r) && k != r));
    }
    let mut all: Vec<PathBuf> = changed
        .changed
        .iter()
        .flat_map(|p| {
            p.ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .collect();
    all.sort();
    all.dedup();
    let mut dirs = Vec::new();
    for rel in &all {
        if kept.covers(rel) {
            continue;
        }
        let src = view.join(rel);
        let dst = root.join(rel);
        let md = match fs::symlink_metadata(&src) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !kept.leads_to_kept(rel) {
                    remove_any(&dst)?;
                }
                layout.entries.retain(|k, _| !k.starts_with(rel));
                continue;
            }
            Err(e) => return Err(io_at(&src)(e)),
        };
        let current = fs::symlink_metadata(&dst).ok();
        if let (Some(laid), Some(cur)) = (layout.entries.get(rel), &current) {
            if laid.source == Sig::of(&md) && laid.placed == Sig::at(&dst, cur) {
                continue;
            }
        }
        if !(md.is_dir() || md.is_file() || md.file_type().is_symlink()) {
            return Ok(false);
        }
        place_entry(&src, &dst, &md, current.as_ref())?;
        if md.is_dir() {
            dirs.push((rel.clone(), md));
        }
        let placed = fs::symlink_metadata(&dst).map_err(io_at(&dst))?;
        let source = fs::symlink_metadata(&src).map_err(io_at(&src))?;
        layout.entries.insert(
            rel.clone(),
            Laid {
                source: Sig::of(&source),
                placed: Sig::at(&dst, &placed),
            },
        );
    }
    for (rel, md) in dirs.iter().rev() {
        let dst = root.join(rel);
        set_times(&dst, md);
        if let (Ok(cur), Some(laid)) = (fs::symlink_metadata(&dst), layout.entries.get_mut(rel)) {
            laid.placed = Sig::at(&dst, &cur);
        }
    }
    Ok(true)
}

/// Make `root` show exactly `view`, walking both whole.
fn lay_out_all(
    view: &Path,
    root: &Path,
    kept: &Kept,
    layout: &mut Layout,
) -> Result<(), WorkerError> {
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, fs::Metadata)> = Vec::new();
    let mut it = walkdir::WalkDir::new(view)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    while let Some(e) = it.next() {
        let e = e.map_err(walk_err(view))?;
        let rel = e
            .path()
            .strip_prefix(view)
            .unwrap_or(e.path())
            .to_path_buf();
        if kept.met(&rel) {
            if e.file_type().is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        let md = fs::symlink_metadata(e.path()).map_err(io_at(e.path()))?;
        let source = Sig::of(&md);
        let dst = root.join(&rel);
        let current = fs::symlink_metadata(&dst).ok();
        seen.insert(rel.clone());
        if md.is_dir() {
            dirs.push((rel.clone(), md.clone()));
        }
        let hard = md.is_file() && md.nlink() > 1;
        let first_link = hard
            .then(|| links.get(&(md.dev(), md.ino())).cloned())
            .flatten();
        if hard && first_link.is_none() {
            links.insert((md.dev(), md.ino()), rel.clone());
        }
        if let (Some(laid), Some(cur)) = (layout.entries.get(&rel), &current) {
            if laid.source == source && laid.placed == Sig::at(&dst, cur) {
                continue;
            }
        }
        if !md.is_dir() && current.as_ref().is_some_and(|c| c.is_dir()) && kept.leads_to_kept(&rel)
        {
            // The image has a link or file where a mount of the container lies below (a
            // Debian image's /var/run -> /run over Kubernetes' /var/run/secrets): the
            // container's directory stays, and the image's entry is not in the way of the
            // diff, which never reports that directory.
            notice_once(format!(
                "the image's /{} is hidden under --isolation container: the container keeps a directory there for its own mounts",
                rel.display()
            ));
            continue;
        }
        match first_link {
            // A second name of a file placed already: the same link, as in the view.
            Some(first) => {
                if current.is_some() {
                    remove_any(&dst)?;
                }
                fs::hard_link(root.join(first), &dst).map_err(io_at(&dst))?;
            }
            None => place_entry(e.path(), &dst, &md, current.as_ref())?,
        }
        let placed = fs::symlink_metadata(&dst).map_err(io_at(&dst))?;
        // Linking changed the view entry's ctime: its signature is taken after placing.
        let source = if md.is_file() {
            Sig::of(&fs::symlink_metadata(e.path()).map_err(io_at(e.path()))?)
        } else {
            source
        };
        layout.entries.insert(
            rel,
            Laid {
                source,
                placed: Sig::at(&dst, &placed),
            },
        );
    }
    // What the view does not have goes (but never a kept path or the way to one).
    let mut it = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    while let Some(e) = it.next() {
        let e = e.map_err(walk_err(root))?;
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap_or(e.path())
            .to_path_buf();
        if kept.met(&rel) {
            if e.file_type().is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        if seen.contains(&rel) {
            continue;
        }
        if kept.leads_to_kept(&rel) {
            // A directory only on the way to one of builder's own paths: as a step that
            // makes it would find it, root's and 0755.
            let md = fs::symlink_metadata(e.path()).map_err(io_at(e.path()))?;
            if md.is_dir() && (md.uid(), md.gid(), md.mode() & 0o7777) != (0, 0, 0o755) {
                let _ = nix::unistd::fchownat(
                    None,
                    e.path(),
                    Some(0.into()),
                    Some(0.into()),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                );
                let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o755));
            }
            continue;
        }
        if e.file_type().is_dir() {
            it.skip_current_dir();
        }
        remove_any(e.path())?;
    }
    layout.entries.retain(|rel, _| seen.contains(rel));
    // Directory times last (placing entries touched them), deepest first.
    for (rel, md) in dirs.iter().rev() {
        let dst = root.join(rel);
        if let Ok(cur) = fs::symlink_metadata(&dst) {
            if (cur.mtime(), cur.mtime_nsec()) != (md.mtime(), md.mtime_nsec()) {
                set_times(&dst, md);
            }
        }
        if let (Ok(cur), Some(laid)) = (fs::symlink_metadata(&dst), layout.entries.get_mut(rel)) {
            laid.placed = Sig::at(&dst, &cur);
        }
    }
    Ok(())
}

/// What the step changed in `root` since [`lay_out`], as an overlay-style diff in `diff`.
fn capture(
    view: &Path,
    root: &Path,
    kept: &Kept,
    layout: &Layout,
    diff: &Path,
) -> Result<Captured, WorkerError> {
    let mut changed: Vec<PathBuf> = Vec::new();
    let mut opaque: HashSet<PathBuf> = HashSet::new();
    // Directories now something else: nothing below them is deleted one by one.
    let mut replaced: HashSet<PathBuf> = HashSet::new();
    let mut present: HashSet<PathBuf> = HashSet::new();
    let mut it = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    while let Some(e) = it.next() {
        let e = e.map_err(walk_err(root))?;
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap_or(e.path())
            .to_path_buf();
        if kept.met(&rel) {
            if e.file_type().is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        let Some(laid) = layout.entries.get(&rel) else {
            // Not laid out: new, unless it is only the way to a kept path.
            if !kept.leads_to_kept(&rel) {
                changed.push(rel);
            }
            continue;
        };
        present.insert(rel.clone());
        let md = fs::symlink_metadata(e.path()).map_err(io_at(e.path()))?;
        let now = Sig::at(e.path(), &md);
        if now == laid.placed {
            continue;
        }
        if md.is_dir() && laid.placed.is_dir() {
            if now.ino != laid.placed.ino || now.born != laid.placed.born {
                // Removed and made again: nothing below it in the view shows through.
                opaque.insert(rel.clone());
                changed.push(rel);
                continue;
            }
            // Children came or went (the ctime says so); the directory itself is part of
            // the layer when its own metadata changed, as overlay copies it up.
            let before = view.join(&rel);
            let same = (now.mode, now.uid, now.gid, now.mtime)
                == (
                    laid.placed.mode,
                    laid.placed.uid,
                    laid.placed.gid,
                    laid.placed.mtime,
                )
                && crate::oci::layer::read_xattrs(&before)
                    == crate::oci::layer::read_xattrs(e.path());
            if !same {
                changed.push(rel);
            }
            continue;
        }
        if laid.placed.is_dir() {
            replaced.insert(rel.clone());
        }
        changed.push(rel);
    }
    let under_opaque = |rel: &Path| {
        rel.ancestors()
            .skip(1)
            .any(|a| opaque.contains(a) || replaced.contains(a))
    };
    let mut deleted: Vec<PathBuf> = layout
        .entries
        .keys()
        .filter(|rel| !present.contains(*rel) && !kept.covers(rel))
        .filter(|rel| !under_opaque(rel))
        .filter(|rel| {
            // Only the topmost of a deleted tree.
            !rel.ancestors()
                .skip(1)
                .filter(|a| !a.as_os_str().is_empty())
                .any(|a| layout.entries.contains_key(a) && !present.contains(a))
        })
        .cloned()
        .collect();
    deleted.sort();
    changed.sort();
    super::write_diff(root, diff, &changed, &deleted)?;
    for rel in &opaque {
        let d = diff.join(rel);
        xattr::set(&d, super::USER_OPAQUE_XATTR, b"y").map_err(io_at(&d))?;
    }
    changed.extend(deleted);
    let remade = opaque.into_iter().chain(replaced).collect();
    Ok(Captured { changed, remade })
}

/// What [`capture`] saw change: every changed, new or deleted path, and the directories
/// made again or replaced (what was below them is gone).
struct Captured {
    changed: Vec<PathBuf>,
    remade: Vec<PathBuf>,
}

/// A RUN --mount made real in `/` for one step.
struct Placed {
    target: PathBuf,
    /// A cache directory moved here, moved back after the step.
    cache: Option<PathBuf>,
}

fn place_mounts(spec: &RunSpec, root: &Path) -> Result<Vec<Placed>, WorkerError> {
    let mut placed = Vec::new();
    for m in &spec.mounts {
        let (target, source, cache) = match m {
            ExtraMount::Bind { source, target, .. } => {
                let is_cache = source
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == "cache-mounts");
                (target, Some(source), is_cache)
            }
            ExtraMount::Tmpfs { target, .. } => (target, None, false),
        };
        let rel =
            crate::oci::unpack::resolve_in_root(root, Path::new(target.trim_start_matches('/')))
                .map_err(|e| WorkerError::Sandbox(SandboxError(format!("{}: {}", target, e))))?;
        let dst = rel;
        remove_any(&dst)?;
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        let mut moved = None;
        match source {
            None => {
                fs::create_dir(&dst).map_err(io_at(&dst))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o1777))
                    .map_err(io_at(&dst))?;
            }
            Some(src) => {
                let md = fs::metadata(src).map_err(io_at(src))?;
                if cache && fs::rename(src, &dst).is_ok() {
                    moved = Some(src.clone());
                } else if md.is_dir() {
                    copy_tree(src, &dst)?;
                    if cache {
                        moved = Some(src.clone());
                    }
                } else if md.is_file() {
                    fs::copy(src, &dst).map_err(io_at(&dst))?;
                    copy_meta(src, &dst, &md);
                } else {
                    return Err(WorkerError::Sandbox(SandboxError(format!(
                        "RUN --mount target {}: {} is neither a file nor a directory (ssh agent sockets cannot be mounted under --isolation container)",
                        target,
                        src.display()
                    ))));
                }
            }
        }
        placed.push(Placed {
            target: dst,
            cache: moved,
        });
    }
    Ok(placed)
}

/// Take the step's mounts away again; a cache keeps what the step left in it.
fn remove_mounts(placed: Vec<Placed>) -> Result<(), WorkerError> {
    let mut first_error = None;
    for p in placed.into_iter().rev() {
        let result = match &p.cache {
            Some(home) => match fs::rename(&p.target, home) {
                Ok(()) => Ok(()),
                Err(_) => (|| {
                    remove_any(home)?;
                    copy_tree(&p.target, home)?;
                    remove_any(&p.target)
                })(),
            },
            None => remove_any(&p.target),
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Run one step in place on `view`; returns its exit and the diff directory.
pub fn run_step(
    view: &Path,
    layers: usize,
    scratch: &Path,
    spec: &RunSpec,
    kept: &Kept,
    on_line: &mut dyn FnMut(&str),
) -> Result<(Exit, PathBuf), WorkerError> {
    if spec.network != NetworkMode::Private {
        return Err(WorkerError::Sandbox(SandboxError(
            "--network=none and --network=host cannot be enforced under --isolation container (the step uses the container's own network)".into(),
        )));
    }
    if spec.insecure {
        return Err(WorkerError::Sandbox(SandboxError(
            "--security=insecure cannot be granted under --isolation container (the container's own privileges apply)".into(),
        )));
    }
    let root = Path::new("/");
    let mut guard = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
    let layout = guard.get_or_insert_with(Layout::default);
    lay_out(view, layers, root, kept, layout)?;
    // Mount targets, and the directories the sandbox would have made for them, are not the
    // step's, and stay out of its layer as they do on the other paths.
    let skeleton = scratch.join("skeleton");
    fs::create_dir_all(&skeleton).map_err(io_at(&skeleton))?;
    let created = super::make_skeleton(view, &skeleton, spec)?;
    let targets: Vec<PathBuf> = spec
        .mounts
        .iter()
        .map(|m| match m {
            ExtraMount::Bind { target, .. } | ExtraMount::Tmpfs { target, .. } => {
                PathBuf::from(target)
            }
        })
        .chain(
            created
                .iter()
                .filter(|c| is_special(c))
                .map(|c| Path::new("/").join(c)),
        )
        .collect();
    let step_kept = kept.with(&targets);
    let placed = place_mounts(spec, root);
    let exit = match placed {
        Ok(placed) => {
            let exit = execute(spec, on_line);
            let removed = remove_mounts(placed);
            let exit = exit?;
            removed?;
            exit
        }
        Err(e) => {
            // The next layout puts back what a half-made mount replaced.
            *guard = None;
            return Err(e);
        }
    };
    let diff = scratch.join("diff");
    fs::create_dir_all(&diff).map_err(io_at(&diff))?;
    if exit == Exit::Code(0) {
        let layout = guard.get_or_insert_with(Layout::default);
        let changed = capture(view, root, &step_kept, layout, &diff)?;
        // A directory made only for a mount point leaves the layer when the step wrote
        // nothing into it, as on the other paths (BuildKit's MountStubsCleaner).
        for rel in created.iter().rev().filter(|c| !is_special(c)) {
            let p = diff.join(rel);
            if fs::read_dir(&p).is_ok_and(|mut d| d.next().is_none()) {
                let _ = fs::remove_dir(&p);
            }
        }
        // Its layer will be applied to the view, and nothing else will have changed `/`
        // unless a mount replaced something there (then the next layout walks everything).
        if spec.mounts.is_empty() {
            let mut changed = changed;
            // The mount points the view lacks (/proc, /dev, /sys) are the container's own.
            changed.changed.extend(created.iter().cloned());
            layout.pending = Some(Pending {
                view: view.to_path_buf(),
                layers: layers + 1,
                changed,
            });
        }
    }
    Ok((exit, diff))
}

/// The command's candidates on the step's PATH.
fn candidates(spec: &RunSpec) -> Vec<String> {
    let first = spec.argv.first().cloned().unwrap_or_default();
    if first.contains('/') {
        return vec![first];
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(crate::oci::image::DEFAULT_PATH);
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{}", d.trim_end_matches('/'), first))
        .collect()
}

fn cstrings(v: impl IntoIterator<Item = String>) -> Result<Vec<std::ffi::CString>, SandboxError> {
    v.into_iter()
        .map(|s| {
            std::ffi::CString::new(s.clone())
                .map_err(|_| SandboxError(format!("{:?} contains a NUL byte", s)))
        })
        .collect()
}

/// Run the command as the step's user in the container's root. A helper process reaps it
/// and then kills whatever it left running (as the end of a PID namespace would).
fn execute(spec: &RunSpec, on_line: &mut dyn FnMut(&str)) -> Result<Exit, WorkerError> {
    use nix::unistd::{fork, ForkResult};
    let argv = cstrings(spec.argv.clone())?;
    let envp = cstrings(spec.env.iter().map(|(k, v)| format!("{}={}", k, v)))?;
    let exes = cstrings(candidates(spec))?;
    let cwd = cstrings([spec.cwd.clone()])?.remove(0);
    let groups: Vec<nix::unistd::Gid> = spec
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    let rlimits = super::sandbox::rlimits_of(&spec.limits);
    let pipe = |_| SandboxError("pipe".into());
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe)?;
    // SAFETY: the child only uses what was prepared above, then execs or exits.
    match unsafe { fork() }.map_err(|e| SandboxError(format!("fork: {}", e)))? {
        ForkResult::Child => {
            drop(out_r);
            drop(err_r);
            let err_fd = err_w.as_raw_fd();
            let outcome = super::sandbox::set_rlimits(&rlimits)
                .and_then(|_| helper(spec, &argv, &envp, &exes, &cwd, &groups, out_w, &err_w));
            super::sandbox::child::exit_child(err_fd, outcome)
        }
        ForkResult::Parent { child } => {
            drop(out_w);
            drop(err_w);
            super::sandbox::pump_lines(fs::File::from(out_r), on_line);
            let mut setup_error = String::new();
            let _ = fs::File::from(err_r)
                .take(64 * 1024)
                .read_to_string(&mut setup_error);
            let status = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            let status = status.map_err(|e| SandboxError(format!("wait: {}", e)))?;
            if !setup_error.is_empty() {
                return Err(SandboxError(setup_error.trim_end().to_string()).into());
            }
            match status {
                nix::sys::wait::WaitStatus::Exited(_, c) => Ok(Exit::Code(c)),
                nix::sys::wait::WaitStatus::Signaled(_, s, _) => Ok(Exit::Signal(s as i32)),
                other => Err(SandboxError(format!("unexpected wait status {:?}", other)).into()),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn helper(
    spec: &RunSpec,
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    exes: &[std::ffi::CString],
    cwd: &std::ffi::CStr,
    groups: &[nix::unistd::Gid],
    out: OwnedFd,
    err: &OwnedFd,
) -> Result<i32, SandboxError> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    match unsafe { fork() }.map_err(|e| SandboxError(format!("fork: {}", e)))? {
        ForkResult::Child => {
            let outcome = (|| -> Result<i32, SandboxError> {
                nix::unistd::setsid().map_err(|e| SandboxError(format!("setsid: {}", e)))?;
                nix::unistd::setgroups(groups)
                    .map_err(|e| SandboxError(format!("setgroups: {}", e)))?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(spec.gid))
                    .map_err(|e| SandboxError(format!("group {}: {}", spec.gid, e)))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(spec.uid))
                    .map_err(|e| SandboxError(format!("user {}: {}", spec.uid, e)))?;
                // Changing credentials cleared it; the helper's death ends the step.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                nix::unistd::chdir(cwd).map_err(|e| {
                    SandboxError(format!(
                        "working directory {}: {}",
                        cwd.to_string_lossy(),
                        e
                    ))
                })?;
                super::sandbox::child::stdio_to(out.as_raw_fd());
                // SAFETY: a plain call in a forked child.
                unsafe {
                    libc::umask(0o022);
                }
                super::sandbox::close_descriptors_from_3(true);
                let mut last = nix::errno::Errno::ENOENT;
                for exe in exes {
                    let Err(e) = nix::unistd::execve(exe, argv, envp);
                    match e {
                        nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR => {}
                        other => last = other,
                    }
                }
                let name = argv
                    .first()
                    .map(|a| a.to_string_lossy())
                    .unwrap_or_default();
                let msg = format!("builder: exec {}: {}\n", name, last.desc());
                // SAFETY: a write to stderr from a forked child.
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                }
                Ok(if last == nix::errno::Errno::ENOENT {
                    127
                } else {
                    126
                })
            })();
            super::sandbox::child::exit_child(err.as_raw_fd(), outcome)
        }
        ForkResult::Parent { child } => {
            drop(out);
            let code = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, c)) => break c,
                    Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(SandboxError(format!("wait: {}", e))),
                }
            };
            super::sandbox::child::kill_descendants();
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    /// Lay `view` out in a fresh root, let `step` change it, and return the diff.
    fn diff_of(view: &Path, step: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        write(&root.join("stale/left-over"), "from an earlier stage");
        let kept = Kept::of(Vec::new());
        let mut layout = Layout::default();
        lay_out_all(view, &root, &kept, &mut layout).unwrap();
        assert!(
            !root.join("stale").exists(),
            "what the view lacks is removed"
        );
        assert_eq!(fs::read_to_string(root.join("a/one")).unwrap(), "1");
        step(&root);
        let diff = t.path().join("diff");
        fs::create_dir(&diff).unwrap();
        capture(view, &root, &kept, &layout, &diff).unwrap();
        (t, diff)
    }

    fn view() -> tempfile::TempDir {
        let v = tempfile::tempdir().unwrap();
        write(&v.path().join("a/one"), "1");
        write(&v.path().join("a/two"), "2");
        write(&v.path().join("b/three"), "3");
        write(&v.path().join("c/d/four"), "4");
        v
    }

    fn listing(diff: &Path) -> Vec<String> {
        let mut out: Vec<String> = walkdir::WalkDir::new(diff)
            .min_depth(1)
            .into_iter()
            .flatten()
            .map(|e| {
                let rel = e.path().strip_prefix(diff).unwrap().display().to_string();
                let md = e.metadata().unwrap();
                let whiteout = md.file_type().is_char_device()
                    || xattr::get(e.path(), crate::oci::layer::USER_WHITEOUT_XATTR)
                        .ok()
                        .flatten()
                        .is_some();
                let opaque = xattr::get(e.path(), super::super::USER_OPAQUE_XATTR)
                    .ok()
                    .flatten()
                    .is_some();
                format!(
                    "{}{}{}",
                    rel,
                    if whiteout { " (whiteout)" } else { "" },
                    if opaque { " (opaque)" } else { "" }
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn an_unchanged_root_gives_an_empty_diff() {
        let v = view();
        let (_t, diff) = diff_of(v.path(), |_| {});
        assert!(listing(&diff).is_empty(), "{:?}", listing(&diff));
    }

    #[test]
    fn changes_deletions_and_a_remade_directory_are_what_overlay_gives() {
        let v = view();
        let (_t, diff) = diff_of(v.path(), |root| {
            // Same size, mtime put back: the ctime still tells.
            let md = fs::metadata(root.join("a/one")).unwrap();
            fs::write(root.join("a/one"), "9").unwrap();
            set_times(&root.join("a/one"), &md);
            fs::remove_file(root.join("a/two")).unwrap();
            fs::remove_dir_all(root.join("b")).unwrap();
            fs::create_dir(root.join("b")).unwrap();
            write(&root.join("b/new"), "n");
            fs::remove_dir_all(root.join("c")).unwrap();
        });
        assert_eq!(
            listing(&diff),
            [
                "a",
                "a/one",
                "a/two (whiteout)",
                "b (opaque)",
                "b/new",
                "c (whiteout)"
            ]
        );
    }

    #[test]
    fn kept_paths_are_never_touched_and_never_in_the_diff() {
        let v = view();
        std::os::unix::fs::symlink("/run", v.path().join("var-run")).unwrap();
        fs::create_dir_all(v.path().join("run")).unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        write(&root.join("var-run/secrets/token"), "secret");
        write(&root.join("builder/bin/builder"), "binary");
        let kept = Kept::of(vec!["/var-run/secrets".into(), "/builder".into()]);
        let mut layout = Layout::default();
        lay_out_all(v.path(), &root, &kept, &mut layout).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("var-run/secrets/token")).unwrap(),
            "secret"
        );
        assert_eq!(
            fs::read_to_string(root.join("builder/bin/builder")).unwrap(),
            "binary"
        );
        write(
            &root.join("builder/store/blob"),
            "written by builder during the step",
        );
        write(&root.join("a/new"), "made by the step");
        let diff = t.path().join("diff");
        fs::create_dir(&diff).unwrap();
        capture(v.path(), &root, &kept, &layout, &diff).unwrap();
        assert_eq!(listing(&diff), ["a", "a/new"]);
    }

    #[test]
    fn the_next_step_re_lays_out_only_what_the_last_one_changed() {
        let v = view();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let kept = Kept::of(Vec::new());
        let mut layout = Layout::default();
        lay_out(v.path(), 1, &root, &kept, &mut layout).unwrap();
        // A step: a change, a deletion, a remade directory, a new file.
        fs::write(root.join("a/one"), "changed").unwrap();
        fs::remove_file(root.join("a/two")).unwrap();
        fs::remove_dir_all(root.join("c")).unwrap();
        fs::create_dir(root.join("c")).unwrap();
        write(&root.join("c/e"), "e");
        write(&root.join("n/new"), "new");
        let diff = t.path().join("diff");
        fs::create_dir(&diff).unwrap();
        let captured = capture(v.path(), &root, &kept, &layout, &diff).unwrap();
        // The layer, applied to the view as the copy snapshotter does.
        for r in &captured.remade {
            fs::remove_dir_all(v.path().join(r)).unwrap();
        }
        for rel in &captured.changed {
            let (from, to) = (root.join(rel), v.path().join(rel));
            match fs::symlink_metadata(&from) {
                Ok(md) if md.is_dir() => fs::create_dir_all(&to).unwrap(),
                Ok(_) => {
                    let _ = fs::remove_file(&to);
                    fs::create_dir_all(to.parent().unwrap()).unwrap();
                    fs::copy(&from, &to).unwrap();
                }
                Err(_) => remove_any(&to).unwrap(),
            }
        }
        layout.pending = Some(Pending {
            view: v.path().to_path_buf(),
            layers: 2,
            changed: captured,
        });
        lay_out(v.path(), 2, &root, &kept, &mut layout).unwrap();
        assert!(layout.pending.is_none());
        // A step that changes nothing then has an empty layer.
        let diff = t.path().join("diff2");
        fs::create_dir(&diff).unwrap();
        capture(v.path(), &root, &kept, &layout, &diff).unwrap();
        assert!(listing(&diff).is_empty(), "{:?}", listing(&diff));
        let mut laid: Vec<_> = layout.entries.keys().cloned().collect();
        laid.sort();
        let mut fresh = Layout::default();
        let other = t.path().join("other");
        fs::create_dir(&other).unwrap();
        lay_out_all(v.path(), &other, &kept, &mut fresh).unwrap();
        let mut want: Vec<_> = fresh.entries.keys().cloned().collect();
        want.sort();
        assert_eq!(laid, want, "the same paths as a full layout");
        assert_eq!(fs::read_to_string(root.join("c/e")).unwrap(), "e");
        assert!(!root.join("c/d").exists() && !root.join("a/two").exists());
    }
}
