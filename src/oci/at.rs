//! Files reached through an open handle on their directory. A walk or a layer writer visits
//! many files of one directory in a row; resolving each by name in a directory already open
//! spares the kernel a lookup of every leading path component, per file.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};

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
            let fd = nix::fcntl::open(
                parent_or_cwd,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from)?;
            // SAFETY: `open` just returned this descriptor, and nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
        .map_err(io::Error::from)?;
        // SAFETY: `openat` just returned this descriptor, and nothing else owns it.
        Ok(unsafe { fs::File::from_raw_fd(fd) })
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
