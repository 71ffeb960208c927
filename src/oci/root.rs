//! A directory held open as the root of everything resolved in it: an image's root file
//! system or the build context. A path is resolved inside the held directory, as the kernel
//! resolves it for a process chrooted there: `..` stops at the root and a symlink, absolute or
//! relative, never leads out. Reads of files found this way are of regular files only, and
//! bounded: an image whose `/etc/passwd` is a FIFO, `/dev/zero` or a link to the host's
//! `/etc/shadow` gets an error naming the path, never the host's file or a hang.
//!
//! The kernel does the resolving (`openat2` with `RESOLVE_IN_ROOT`), atomically. Where
//! `openat2` is missing or filtered (an older kernel, a container's seccomp profile), the same
//! walk is done here one component at a time, each opened `O_NOFOLLOW` relative to a held
//! descriptor, with `..` taken from our own stack of descriptors, never from the file system.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode};

/// Symlinks followed in one resolution before it is refused, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// How every component of a walk is looked at: a handle that opens nothing, never followed.
const O_PATH_NOFOLLOW: OFlag = OFlag::O_PATH
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// What one component of a walk turned out to be.
enum Step {
    /// A directory, held.
    Dir(OwnedFd),
    /// A symlink, whose target's components were put in front of the rest of the walk;
    /// `absolute` says the walk starts again from the root.
    Link { absolute: bool },
    /// Anything else.
    Other,
    /// Nothing that could be opened there (not there, or below a file).
    Missing(io::Error),
}

/// Look at `part` in the directory `at`: a symlink's target is queued on `pending`, counted
/// against [`MAX_LINKS`] in `links`.
fn step(
    at: i32,
    part: &OsString,
    pending: &mut Vec<OsString>,
    links: &mut usize,
) -> io::Result<Step> {
    let fd = match nix::fcntl::openat(Some(at), part.as_os_str(), O_PATH_NOFOLLOW, Mode::empty()) {
        Ok(fd) => owned(fd),
        Err(e) => return Ok(Step::Missing(e.into())),
    };
    let st = fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Step::Dir(fd),
        libc::S_IFLNK => {
            *links += 1;
            if *links > MAX_LINKS {
                return Err(Errno::ELOOP.into());
            }
            let target =
                nix::fcntl::readlinkat(Some(at), part.as_os_str()).map_err(io::Error::from)?;
            let target = Path::new(&target);
            pending.extend(components(target).into_iter().rev());
            Step::Link {
                absolute: target.is_absolute(),
            }
        }
        _ => Step::Other,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is {size} bytes, over the limit of {limit} bytes for this file")]
    TooBig { path: String, size: u64, limit: u64 },
}

/// A directory held open; every path given to it is resolved inside it.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// What a file's type bits name, for errors.
fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symlink",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        _ => "of an unknown type",
    }
}

fn owned(fd: i32) -> OwnedFd {
    // SAFETY: called only with a descriptor a successful open just returned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `rel`'s components as the resolver takes them: names and `..`; `/` and `.` say nothing
/// inside a root.
fn components(rel: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    // A trailing `/` or `/.` says the last component must be a directory, as the kernel
    // reads it: `.` stands for that check.
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(rel.as_os_str());
    if bytes.ends_with(b"/") || bytes.ends_with(b"/.") {
        out.push(".".into());
    }
    out
}

impl Root {
    /// Hold `path` open as a root.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        Ok(Root {
            fd: owned(fd),
            path: path.to_path_buf(),
        })
    }

    /// Open `rel` (relative, or absolute as the image sees it) with `flags`; symlinks in it are
    /// followed, the last one too, but never out of the root, and magic links never.
    pub fn open_at(&self, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        // openat2 refuses O_PATH with any flag but these three.
        let extra = if flags.contains(OFlag::O_PATH) {
            OFlag::O_CLOEXEC
        } else {
            OFlag::O_CLOEXEC | OFlag::O_NOCTTY
        };
        let how = OpenHow::new()
            .flags(flags | extra)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match self.openat2(rel, how) {
            Some(opened) => opened,
            // The same walk, done here: immune to renames elsewhere.
            None => self.open_walking(rel, flags),
        }
    }

    /// `openat2` from the root, tried again while the kernel asks (EAGAIN: a rename somewhere
    /// on the system while `..` was resolved), or `None` where it is not to be had (an old
    /// kernel, a seccomp profile that predates it, or renames that never stop).
    fn openat2(&self, rel: &Path, how: OpenHow) -> Option<io::Result<OwnedFd>> {
        let rel_or_dot = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        for _ in 0..16 {
            match nix::fcntl::openat2(self.fd.as_raw_fd(), rel_or_dot, how) {
                Ok(fd) => return Some(Ok(owned(fd))),
                Err(Errno::EAGAIN) => continue,
                Err(Errno::ENOSYS) | Err(Errno::EPERM) => return None,
                Err(e) => return Some(Err(e.into())),
            }
        }
        None
    }

    /// Open `rel` below the root with `flags`, following no symlink at all, the last
    /// component included (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW`): a symlink
    /// on the way is ELOOP and a `..` is EXDEV. For a tree whose walk found no links, such as
    /// the build context.
    pub fn open_beneath(&self, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        let flags = flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        if let Some(opened) = self.openat2(rel, how) {
            return opened;
        }
        // One component at a time, none followed.
        let parts: Vec<_> = rel.components().collect();
        let mut at: Option<OwnedFd> = None;
        for (i, c) in parts.iter().enumerate() {
            let Component::Normal(name) = c else {
                return Err(Errno::EXDEV.into());
            };
            let from = at.as_ref().map_or(self.fd.as_raw_fd(), |f| f.as_raw_fd());
            if i + 1 == parts.len() {
                return nix::fcntl::openat(Some(from), *name, flags, Mode::empty())
                    .map(owned)
                    .map_err(io::Error::from);
            }
            let fd = nix::fcntl::openat(Some(from), *name, O_PATH_NOFOLLOW, Mode::empty())
                .map(owned)
                .map_err(io::Error::from)?;
            match fstat(fd.as_raw_fd()).map_err(io::Error::from)?.st_mode & libc::S_IFMT {
                libc::S_IFDIR => at = Some(fd),
                libc::S_IFLNK => return Err(Errno::ELOOP.into()),
                _ => return Err(Errno::ENOTDIR.into()),
            }
        }
        nix::fcntl::openat(Some(self.fd.as_raw_fd()), ".", flags, Mode::empty())
            .map(owned)
            .map_err(io::Error::from)
    }

    /// [`Root::open_at`] without `openat2`: one component at a time, each opened `O_NOFOLLOW`
    /// beside the last, symlinks read and their parts walked the same way.
    pub fn open_walking(&self, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        // The directories from the root down to where the walk is; `..` pops, never past
        // the root itself.
        let mut dirs: Vec<OwnedFd> = Vec::new();
        let mut pending: Vec<OsString> = components(rel);
        pending.reverse();
        let mut links = 0;
        let here = |dirs: &Vec<OwnedFd>| -> i32 {
            dirs.last().map_or(self.fd.as_raw_fd(), |d| d.as_raw_fd())
        };
        while let Some(part) = pending.pop() {
            if part == ".." {
                dirs.pop();
                continue;
            }
            if part == "." {
                // Only ever last (see `components`): the walk ends in a directory.
                continue;
            }
            let last = pending.is_empty();
            match step(here(&dirs), &part, &mut pending, &mut links)? {
                Step::Link { absolute: true } => dirs.clear(),
                Step::Link { absolute: false } => {}
                Step::Missing(e) => return Err(e),
                Step::Dir(fd) if !last => dirs.push(fd),
                _ if !last => return Err(Errno::ENOTDIR.into()),
                _ => {
                    pending.push(part);
                    break;
                }
            }
        }
        // The last component (or the directory the walk ended in) is opened for real.
        match pending.pop() {
            Some(name) => nix::fcntl::openat(
                Some(here(&dirs)),
                name.as_os_str(),
                flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                Mode::empty(),
            ),
            None => nix::fcntl::openat(
                Some(here(&dirs)),
                ".",
                flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                Mode::empty(),
            ),
        }
        .map(owned)
        .map_err(io::Error::from)
    }

    /// `rel` resolved inside the root, as a path on the host, for callers that create what is
    /// not there yet (a WORKDIR, a COPY destination, a mount point). Existing components are
    /// walked as [`Root::open_walking`] walks them, from held descriptors; from the first one
    /// that does not exist (or is not a directory) on, the rest is taken as written, `..`
    /// never climbing past the root.
    pub fn resolve(&self, rel: &Path) -> io::Result<PathBuf> {
        // `names[..dirs.len()]` are directories that exist, each held open in `dirs`.
        let mut dirs: Vec<OwnedFd> = Vec::new();
        let mut names: Vec<OsString> = Vec::new();
        let mut pending: Vec<OsString> = components(rel);
        pending.reverse();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if part == "." {
                continue;
            }
            if part == ".." {
                names.pop();
                dirs.truncate(names.len());
                continue;
            }
            if names.len() > dirs.len() {
                names.push(part);
                continue;
            }
            let at = dirs.last().map_or(self.fd.as_raw_fd(), |d| d.as_raw_fd());
            match step(at, &part, &mut pending, &mut links)? {
                Step::Link { absolute } => {
                    if absolute {
                        dirs.clear();
                        names.clear();
                    }
                }
                Step::Dir(fd) => {
                    dirs.push(fd);
                    names.push(part);
                }
                // What is not there, or not a directory, ends the walk: the rest as written.
                Step::Other | Step::Missing(_) => names.push(part),
            }
        }
        let mut out = self.path.clone();
        out.extend(names);
        Ok(out)
    }

    /// The whole content of the regular file `rel`, at most `limit` bytes, or `None` when it
    /// does not exist. Anything else there (a FIFO, a device, a directory) is an error naming
    /// the path, and so is a file over the limit: nothing is read from it.
    pub fn read_regular(&self, rel: &Path, limit: u64) -> Result<Option<Vec<u8>>, RootError> {
        let shown = || format!("/{}", rel.display()).replace("//", "/");
        let io_err = |source: io::Error| RootError::Io {
            path: shown(),
            source,
        };
        // Looked at first through a handle that opens nothing: opening a FIFO or a device
        // for reading could block or act.
        let probe = match self.open_at(rel, OFlag::O_PATH) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let seen = fstat(probe.as_raw_fd()).map_err(|e| io_err(e.into()))?;
        if seen.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(RootError::NotRegular {
                path: shown(),
                kind: kind_name(seen.st_mode),
            });
        }
        if seen.st_size as u64 > limit {
            return Err(RootError::TooBig {
                path: shown(),
                size: seen.st_size as u64,
                limit,
            });
        }
        let fd = self
            .open_at(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
            .map_err(io_err)?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err(e.into()))?;
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) {
            return Err(io_err(io::Error::other(
                "changed while it was being opened",
            )));
        }
        let mut out = Vec::with_capacity(st.st_size.max(0) as usize);
        // Bounded again while reading: a file that grows is cut at the limit and refused.
        fs::File::from(fd)
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(io_err)?;
        if out.len() as u64 > limit {
            return Err(RootError::TooBig {
                path: shown(),
                size: out.len() as u64,
                limit,
            });
        }
        Ok(Some(out))
    }
}

impl AsFd for Root {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn ino(fd: &OwnedFd) -> (u64, u64) {
        let st = fstat(fd.as_raw_fd()).unwrap();
        (st.st_dev, st.st_ino)
    }

    #[test]
    fn links_and_dotdot_stay_inside_and_a_fifo_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("host-secret");
        fs::write(&outside, "host").unwrap();
        let r = t.path().join("root");
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("host-secret"), "image").unwrap();
        symlink("../../../../host-secret", r.join("etc/rel")).unwrap();
        symlink("/host-secret", r.join("etc/abs")).unwrap();
        // The host's path, taken inside the root: nothing is there.
        symlink(&outside, r.join("etc/host")).unwrap();
        symlink("/dev/zero", r.join("etc/zero")).unwrap();
        nix::unistd::mkfifo(&r.join("etc/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let root = Root::open(&r).unwrap();
        for name in ["etc/rel", "etc/abs", "/etc/rel", "../../etc/../host-secret"] {
            let got = root.read_regular(Path::new(name), 1024).unwrap().unwrap();
            assert_eq!(got, b"image", "{name}");
            let walked = root.open_walking(Path::new(name), OFlag::O_PATH).unwrap();
            let resolved = root.open_at(Path::new(name), OFlag::O_PATH).unwrap();
            assert_eq!(ino(&walked), ino(&resolved), "{name}");
        }
        assert!(root
            .read_regular(Path::new("etc/zero"), 1024)
            .unwrap()
            .is_none());
        assert!(root
            .read_regular(Path::new("etc/host"), 1024)
            .unwrap()
            .is_none());
        let fifo = root.read_regular(Path::new("etc/fifo"), 1024).unwrap_err();
        assert!(fifo.to_string().contains("/etc/fifo is a FIFO"), "{fifo}");
        let big = root.read_regular(Path::new("host-secret"), 2).unwrap_err();
        assert!(matches!(big, RootError::TooBig { .. }), "{big}");
    }

    /// Random farms of directories, files and symlinks (relative, absolute, climbing, looping,
    /// to the host), and random paths through them: the kernel's resolution and the walk agree
    /// on every path, and nothing outside the root is ever reached.
    #[test]
    fn fuzz_symlink_farms_resolve_inside_the_root_and_both_resolvers_agree() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use std::os::unix::fs::MetadataExt;
        let mut rng = StdRng::seed_from_u64(0x29);
        let names = ["a", "b", "c", "etc", "passwd", "..", "."];
        for round in 0..150 {
            let t = tempfile::tempdir().unwrap();
            let outside = t.path().join("outside");
            fs::create_dir_all(outside.join("etc")).unwrap();
            fs::write(outside.join("etc/passwd"), "host").unwrap();
            let host_ino = fs::metadata(outside.join("etc/passwd")).unwrap().ino();
            let r = t.path().join("root");
            fs::create_dir_all(&r).unwrap();
            let mut dirs = vec![r.clone()];
            for _ in 0..25 {
                let parent = dirs[rng.gen_range(0..dirs.len())].clone();
                let name = names[rng.gen_range(0..5)];
                let at = parent.join(name);
                if fs::symlink_metadata(&at).is_ok() {
                    continue;
                }
                match rng.gen_range(0..4) {
                    0 => {
                        fs::create_dir(&at).unwrap();
                        dirs.push(at);
                    }
                    1 => fs::write(&at, "image").unwrap(),
                    _ => {
                        let len = rng.gen_range(1..6);
                        let mut target: Vec<&str> = (0..len)
                            .map(|_| names[rng.gen_range(0..names.len())])
                            .collect();
                        let target = match rng.gen_range(0..4) {
                            0 => format!("/{}", target.join("/")),
                            1 => format!("{}/etc/passwd", outside.display()),
                            2 => {
                                target.insert(0, "../../../../../..");
                                target.join("/")
                            }
                            _ => target.join("/"),
                        };
                        symlink(&target, &at).unwrap();
                    }
                }
            }
            let root = Root::open(&r).unwrap();
            for _ in 0..40 {
                let len = rng.gen_range(1..6);
                let path: Vec<&str> = (0..len)
                    .map(|_| names[rng.gen_range(0..names.len())])
                    .collect();
                let path = path.join("/");
                let kernel = root.open_at(Path::new(&path), OFlag::O_PATH);
                let walked = root.open_walking(Path::new(&path), OFlag::O_PATH);
                match (&kernel, &walked) {
                    (Ok(k), Ok(w)) => {
                        assert_eq!(ino(k), ino(w), "round {round}: {path}");
                        assert_ne!(ino(k).1, host_ino, "round {round}: {path} reached the host");
                    }
                    (Err(k), Err(w)) => {
                        assert_eq!(k.raw_os_error(), w.raw_os_error(), "round {round}: {path}")
                    }
                    _ => panic!("round {round}: {path}: kernel {kernel:?}, walk {walked:?}"),
                }
                // Where the path exists, resolving it names what the kernel opened.
                if let Ok(k) = &kernel {
                    let resolved = root.resolve(Path::new(&path)).unwrap();
                    let md = fs::metadata(&resolved).unwrap();
                    assert_eq!(
                        (md.dev(), md.ino()),
                        ino(k),
                        "round {round}: {path} -> {}",
                        resolved.display()
                    );
                }
                if let Ok(Some(b)) = root.read_regular(Path::new(&path), 16) {
                    assert_eq!(b, b"image", "round {round}: {path}");
                }
            }
        }
    }
}
