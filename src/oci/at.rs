//! Files reached through an open handle on their directory. A walk or a layer writer visits
//! many files of one directory in a row; resolving each by name in a directory already open
//! spares the kernel a lookup of every leading path component, per file.
//!
//! Below a *confined* directory (the build context, for the length of a build: [`confine`]),
//! directories are opened from a descriptor held on that directory with no symlink followed
//! on the way (`openat2` `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or one `O_NOFOLLOW` open per
//! component), and files `O_NOFOLLOW`. The paths a build walked are free of symlinks; a
//! directory swapped for a symlink to the host after the walk is refused, never followed.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};

use super::root::Root;

/// The confined directories and a descriptor held on each.
static CONFINED: RwLock<Vec<(PathBuf, Arc<Root>)>> = RwLock::new(Vec::new());

/// While this lives, everything below its directory is opened without following symlinks.
#[must_use]
pub struct Confined {
    fd: Arc<Root>,
}

/// Confine opens below `dir` (an absolute path without symlinks: a canonical context path)
/// until the returned guard is dropped.
pub fn confine(dir: &Path) -> io::Result<Confined> {
    let fd = Arc::new(Root::open(dir)?);
    if let Ok(mut c) = CONFINED.write() {
        c.push((dir.to_path_buf(), fd.clone()));
    }
    Ok(Confined { fd })
}

impl Drop for Confined {
    fn drop(&mut self) {
        if let Ok(mut c) = CONFINED.write() {
            c.retain(|(_, fd)| !Arc::ptr_eq(fd, &self.fd));
        }
    }
}

/// The confined directory `path` is in (the deepest), and `path` relative to it.
fn confined_at(path: &Path) -> Option<(Arc<Root>, PathBuf)> {
    let c = CONFINED.read().ok()?;
    c.iter()
        .filter_map(|(dir, fd)| Some((fd, path.strip_prefix(dir).ok()?)))
        .max_by_key(|(_, rel)| std::cmp::Reverse(rel.as_os_str().len()))
        .map(|(fd, rel)| (fd.clone(), rel.to_path_buf()))
}

/// What a symlink met on a confined path says.
fn swapped(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{}: a symlink is on this path, where the build's walk found none (the build context changed during the build; links are never followed out of it)",
        path.display()
    ))
}

/// `path` opened with `flags`, its last component never followed, and below a confined
/// directory none of them: a symlink met there is an error saying the context changed.
pub fn open_nofollow(path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let opened = match confined_at(path) {
        Some((dir, rel)) => dir.open_beneath(&rel, flags),
        None => open_path(path, flags | OFlag::O_NOFOLLOW),
    };
    opened.map_err(|e| match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
        Errno::ELOOP | Errno::EXDEV => swapped(path),
        _ => e,
    })
}

/// `f` if what was opened is a regular file: checked on the open file, not on the path
/// stat'ed earlier.
fn regular_only(f: fs::File, path: &Path) -> io::Result<fs::File> {
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::other(format!(
            "{}: not a regular file any more (it changed during the build)",
            path.display()
        )));
    }
    Ok(f)
}

/// Open the directory `path` for listing or as a base for `*at` calls: below a confined
/// directory, without following any symlink.
pub fn open_dir(path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    match confined_at(path) {
        Some(_) => open_nofollow(path, flags | OFlag::O_DIRECTORY),
        None => open_path(path, flags | OFlag::O_DIRECTORY),
    }
}

/// `open(path, flags)`, close-on-exec, as an owned descriptor.
fn open_path(path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, Mode::empty())
        // SAFETY: `open` just returned this descriptor, and nothing else owns it.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .map_err(io::Error::from)
}

/// Open the regular file `path` for reading, its last component never followed (and below a
/// confined directory, none of them). What was opened is checked to be a regular file.
pub fn open_regular(path: &Path) -> io::Result<fs::File> {
    // Non-blocking: a file replaced by a FIFO must not hang the build (regular files ignore
    // the flag).
    let fd = open_nofollow(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
    regular_only(fs::File::from(fd), path)
}

/// What a walk keeps of a file's `lstat` (a context has as many as files: this is small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStat {
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
    /// A file's sha256, where whoever took this stat also knows the content.
    pub content: Option<[u8; 32]>,
}

impl SourceStat {
    pub fn of(st: &FileStat) -> SourceStat {
        SourceStat {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: st.st_mtime,
            nlink: st.st_nlink,
            dev: st.st_dev,
            ino: st.st_ino,
            content: None,
        }
    }

    /// The type bits (`S_IFREG`, `S_IFDIR`, ...).
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// The directory last used, kept open for the next path in it.
#[derive(Default)]
pub struct DirCursor {
    dir: Option<(PathBuf, OwnedFd)>,
}

impl DirCursor {
    /// A handle on `path`'s directory and `path`'s last component, or `None` for a path
    /// without both (`/`, `..`).
    fn at<'p>(&mut self, path: &'p Path) -> io::Result<Option<(i32, &'p std::ffi::OsStr)>> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(None);
        };
        if self.dir.as_ref().map(|(p, _)| p.as_path()) != Some(parent) {
            let parent_or_cwd = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            let fd = open_dir(parent_or_cwd, OFlag::O_PATH)?;
            self.dir = Some((parent.to_path_buf(), fd));
        }
        Ok(self.dir.as_ref().map(|(_, fd)| (fd.as_raw_fd(), name)))
    }

    /// `lstat(path)`.
    pub fn lstat(&mut self, path: &Path) -> io::Result<FileStat> {
        match self.at(path)? {
            Some((fd, name)) => {
                nix::sys::stat::fstatat(Some(fd), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            }
            None => nix::sys::stat::lstat(path),
        }
        .map_err(io::Error::from)
    }

    /// `path` opened for reading. The last component must not be a symlink: the file was
    /// seen as a regular file, and one replaced by a link since is refused, not followed.
    pub fn open_file(&mut self, path: &Path) -> io::Result<fs::File> {
        // Non-blocking: a file replaced by a FIFO must not hang the build (regular files
        // ignore the flag).
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        let fd = match self.at(path)? {
            Some((fd, name)) => nix::fcntl::openat(Some(fd), name, flags, Mode::empty()),
            None => nix::fcntl::open(path, flags, Mode::empty()),
        }
        .map_err(|e| match e {
            Errno::ELOOP => swapped(path),
            e => e.into(),
        })?;
        // SAFETY: `openat` just returned this descriptor, and nothing else owns it.
        regular_only(unsafe { fs::File::from_raw_fd(fd) }, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_opens_as_paths_do_but_never_follows_a_last_symlink() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("sub"));
        fs::write(&a, "hello").unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(b.join("c"), "x").unwrap();
        std::os::unix::fs::symlink(&a, t.path().join("link")).unwrap();
        let mut cur = DirCursor::default();
        for p in [a.clone(), b.join("c"), a.clone(), t.path().join("link")] {
            let st = cur.lstat(&p).unwrap();
            let md = fs::symlink_metadata(&p).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                (st.st_ino, st.st_mode, st.st_size as u64),
                (md.ino(), md.mode(), md.len())
            );
        }
        let mut s = String::new();
        io::Read::read_to_string(&mut cur.open_file(&a).unwrap(), &mut s).unwrap();
        assert_eq!(s, "hello");
        assert!(cur.open_file(&t.path().join("link")).is_err());
        assert!(cur.lstat(&t.path().join("missing")).is_err());
    }
}
