//! Running a RUN step against a stage's root filesystem and capturing what it changed.
//!
//! Two snapshotters give the same layer for the same change:
//! - [`Snapshotter::Overlay`]: the root is an overlay of the stage's (read-only) root with a
//!   fresh upper directory; afterwards the upper directory *is* the diff (overlay whiteouts are
//!   turned into OCI whiteouts by the layer writer), so a step that touches one file costs one
//!   file.
//! - [`Snapshotter::Copy`]: where overlayfs cannot be mounted, the root is copied, the step runs
//!   in the copy, and a walk compares the two (type, mode, owner, size, mtime, link target,
//!   xattrs) to build the same kind of diff directory.
//!
//! Mount points the sandbox needs (/proc, /dev, /sys, /etc/resolv.conf, RUN --mount targets)
//! come from a skeleton layered above the shared snapshots (overlay), or are created in the
//! private root before the step and removed after it (copy). None of them stays in the
//! diff unless the step wrote into it, as BuildKit (v0.11 and later) removes the mount
//! stubs it made (`executor.MountStubsCleaner`): the empty directories and files made for
//! `/proc`, `/dev`, `/sys`, `/etc/hosts`, `/etc/resolv.conf` and `RUN --mount` targets, and
//! their new parents. dockerd 20.10's BuildKit kept the directories.

pub mod inplace;
pub mod sandbox;
pub mod snapshots;
pub mod syscall;
pub mod terminal;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::oci::layer::read_xattrs;
use crate::oci::unpack::{resolve_in_root, set_mtime};
pub use sandbox::{Exit, ExtraMount, RunSpec, SandboxError};

/// How a step's changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshotter {
    Overlay,
    Copy,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> WorkerError + '_ {
    move |source| WorkerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How builder's user namespace maps ids when it runs without root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMapping {
    /// Builder runs as real root: nothing is mapped.
    Host,
    /// Only the caller's own uid and gid, as 0. Files owned by other ids cannot be made.
    Single,
    /// The caller as 0, and `1..=count` from its subordinate ranges (`newuidmap` and
    /// `newgidmap`), as podman, Buildah and rootlesskit map them.
    Ranges { uids: u32, gids: u32 },
}

static MAPPING: std::sync::OnceLock<IdMapping> = std::sync::OnceLock::new();

/// Whether builder runs rootless, as root of its own user namespace.
pub fn rootless() -> bool {
    id_mapping() != IdMapping::Host
}

/// The ids builder's user namespace maps.
pub fn id_mapping() -> IdMapping {
    MAPPING.get().copied().unwrap_or(IdMapping::Host)
}

/// How to get every id mapped, for messages about single-id mode.
pub const RANGE_HINT: &str = "give your user subordinate ranges (as root: `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 USER`) and install newuidmap and newgidmap (Debian's `uidmap`)";

/// One line of `/etc/subuid` or `/etc/subgid`: ids `start..start+count` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    pub start: u32,
    pub count: u32,
}

/// The ranges `file` gives the user `name` (or its numeric id), in file order. Lines that
/// do not parse are skipped, as shadow's own tools skip them; the total is capped at the
/// 32-bit id space.
pub fn subordinate_ranges(file: &str, name: Option<&str>, id: u32) -> Vec<SubRange> {
    let mut out = Vec::new();
    let mut total: u64 = 0;
    for line in file.lines().take(100_000) {
        let mut parts = line.trim().splitn(3, ':');
        let (Some(who), Some(start), Some(count)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !(Some(who) == name || who == id.to_string()) {
            continue;
        }
        let (Ok(start), Ok(count)) = (start.parse::<u32>(), count.trim().parse::<u32>()) else {
            continue;
        };
        if count == 0 || u64::from(start) + u64::from(count) > u64::from(u32::MAX) {
            continue;
        }
        // Container ids 1.. are handed out consecutively; id 4294967295 stays unmapped.
        if total + u64::from(count) > u64::from(u32::MAX) - 2 {
            break;
        }
        total += u64::from(count);
        out.push(SubRange { start, count });
    }
    out
}

/// The `newuidmap`/`newgidmap` arguments after the pid: `0 self 1`, then each range at the
/// next free container id.
fn map_arguments(own: u32, ranges: &[SubRange]) -> Vec<String> {
    let mut args = vec!["0".to_string(), own.to_string(), "1".to_string()];
    let mut next: u64 = 1;
    for r in ranges {
        args.extend([next.to_string(), r.start.to_string(), r.count.to_string()]);
        next += u64::from(r.count);
    }
    args
}

/// Find `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Rootless mode: become root of a new user namespace with a mount namespace we own.
///
/// With subordinate ranges for the caller in `/etc/subuid` and `/etc/subgid`, and
/// `newuidmap`/`newgidmap` installed, every id the ranges cover is mapped, so an image keeps
/// its owners and a USER of any of them runs. Otherwise only the caller's own ids are mapped
/// (to 0): files can only be owned by root, setgroups is denied and a USER with another id
/// cannot run; `Ok(Some(reason))` says why the ranges were not used. Must be called before
/// any thread starts.
pub fn enter_user_namespace() -> Result<Option<String>, WorkerError> {
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    let ranges = |file: &str, id: u32| {
        fs::read_to_string(file)
            .map(|text| subordinate_ranges(&text, name.as_deref(), id))
            .unwrap_or_default()
    };
    let (uid_ranges, gid_ranges) = (
        ranges("/etc/subuid", uid.as_raw()),
        ranges("/etc/subgid", gid.as_raw()),
    );
    let tools = (on_path("newuidmap"), on_path("newgidmap"));
    let plan = match (&tools, uid_ranges.is_empty() || gid_ranges.is_empty()) {
        ((Some(u), Some(g)), false) => Ok((u.clone(), g.clone())),
        ((Some(_), Some(_)), true) => Err(format!(
            "no subordinate ranges for {} in /etc/subuid and /etc/subgid",
            name.as_deref()
                .map_or_else(|| uid.to_string(), str::to_string)
        )),
        _ => Err("newuidmap and newgidmap are not installed".to_string()),
    };
    let mapper = match &plan {
        Ok((newuidmap, newgidmap)) => Some(IdMapper::start(
            newuidmap,
            map_arguments(uid.as_raw(), &uid_ranges),
            newgidmap,
            map_arguments(gid.as_raw(), &gid_ranges),
        )?),
        Err(_) => None,
    };
    nix::sched::unshare(
        nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNS,
    )
    .map_err(|e| WorkerError::Io {
        path: PathBuf::from("/proc/self/ns/user"),
        source: io::Error::from(e),
    })?;
    let mapped = match mapper.map(IdMapper::finish) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(e),
        None => Err(plan.err().unwrap_or_default()),
    };
    let write = |p: &str, v: String| {
        fs::write(p, v).map_err(|source| WorkerError::Io {
            path: PathBuf::from(p),
            source,
        })
    };
    let reason = match mapped {
        Ok(()) => {
            let count = |rs: &[SubRange]| rs.iter().map(|r| r.count).sum::<u32>();
            let _ = MAPPING.set(IdMapping::Ranges {
                uids: count(&uid_ranges),
                gids: count(&gid_ranges),
            });
            None
        }
        Err(reason) => {
            // A failed newuidmap wrote nothing: map our own ids ourselves.
            if fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| m.trim().is_empty()) {
                write("/proc/self/uid_map", format!("0 {} 1\n", uid))?;
            }
            if fs::read_to_string("/proc/self/gid_map").is_ok_and(|m| m.trim().is_empty()) {
                write("/proc/self/setgroups", "deny".into())?;
                write("/proc/self/gid_map", format!("0 {} 1\n", gid))?;
            }
            let _ = MAPPING.set(IdMapping::Single);
            Some(reason)
        }
    };
    Ok(reason)
}

/// A child left in the caller's user namespace that maps ids into ours once we have
/// unshared: the set-uid `newuidmap` must act from outside the namespace it maps.
struct IdMapper {
    child: nix::unistd::Pid,
    go: std::os::fd::OwnedFd,
    errors: std::os::fd::OwnedFd,
}

impl IdMapper {
    fn start(
        newuidmap: &Path,
        uid_args: Vec<String>,
        newgidmap: &Path,
        gid_args: Vec<String>,
    ) -> Result<IdMapper, WorkerError> {
        let pipe_err = |e: nix::errno::Errno| WorkerError::Io {
            path: PathBuf::from("pipe"),
            source: io::Error::from(e),
        };
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe_err)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe_err)?;
        let parent = nix::unistd::getpid();
        // SAFETY: builder has no other thread yet; the child runs two programs and exits.
        match unsafe { nix::unistd::fork() }.map_err(pipe_err)? {
            nix::unistd::ForkResult::Child => {
                drop(go_w);
                drop(err_r);
                let mut byte = [0u8; 1];
                let ok = matches!(
                    nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&go_r), &mut byte),
                    Ok(1)
                );
                let mut failure = String::new();
                if ok {
                    for (tool, args) in [(newuidmap, &uid_args), (newgidmap, &gid_args)] {
                        match std::process::Command::new(tool)
                            .arg(parent.to_string())
                            .args(args.iter())
                            .stdin(std::process::Stdio::null())
                            .output()
                        {
                            Ok(o) if o.status.success() => {}
                            Ok(o) => {
                                failure = format!(
                                    "{} failed: {}",
                                    tool.display(),
                                    String::from_utf8_lossy(&o.stderr).trim()
                                );
                                break;
                            }
                            Err(e) => {
                                failure = format!("{}: {}", tool.display(), e);
                                break;
                            }
                        }
                    }
                }
                let _ = nix::unistd::write(&err_w, failure.as_bytes());
                // SAFETY: a forked child ends without running the parent's destructors.
                unsafe { libc::_exit(if ok && failure.is_empty() { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => Ok(IdMapper {
                child,
                go: go_w,
                errors: err_r,
            }),
        }
    }

    /// Let the child map our ids (we have unshared by now) and wait for it.
    fn finish(self) -> Result<(), String> {
        use std::io::Read;
        let _ = nix::unistd::write(&self.go, b"1");
        drop(self.go);
        let mut failure = String::new();
        let _ = fs::File::from(self.errors)
            .take(64 * 1024)
            .read_to_string(&mut failure);
        let status = loop {
            match nix::sys::wait::waitpid(self.child, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        };
        match status {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) if failure.is_empty() => Ok(()),
            _ if !failure.is_empty() => Err(failure),
            other => Err(format!("the id mapper ended with {:?}", other)),
        }
    }
}

/// Whether overlayfs can be mounted here (tried once in a throwaway mount namespace).
pub fn detect(scratch: &Path) -> Snapshotter {
    if std::env::var("BUILDER_SNAPSHOTTER").as_deref() == Ok("copy") {
        return Snapshotter::Copy;
    }
    let dirs = ["l", "u", "w", "m"].map(|d| scratch.join(d));
    for d in &dirs {
        if fs::create_dir_all(d).is_err() {
            return Snapshotter::Copy;
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        dirs[0].display(),
        dirs[1].display(),
        dirs[2].display()
    );
    // SAFETY: the child only unshares, mounts and exits.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_ok()
                && nix::mount::mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .is_ok()
                && nix::mount::mount(
                    Some("overlay"),
                    &dirs[3],
                    Some("overlay"),
                    nix::mount::MsFlags::empty(),
                    Some(data.as_str()),
                )
                .is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => match nix::sys::wait::waitpid(child, None)
        {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Snapshotter::Overlay,
            _ => Snapshotter::Copy,
        },
        Err(_) => Snapshotter::Copy,
    }
}

/// What one step needs besides the command itself.
pub struct StepInput<'a> {
    /// The stage's root filesystem before the step.
    pub view: &'a snapshots::RootView,
    /// A scratch directory for this step (removed by the caller).
    pub scratch: &'a Path,
    /// The spec, with `root` filled in by [`run_step`].
    pub spec: RunSpec,
    /// `--isolation container`: run in place, never touching these paths.
    pub in_place: Option<&'a inplace::Kept>,
    /// A failed step's state to run on instead of the view alone (`builder debug shell`):
    /// its upper directory, laid over the view, or with the copy snapshotter its whole root.
    /// It is read, never changed.
    pub failed_state: Option<&'a Path>,
}

/// How RUN steps are isolated (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// builder's own sandbox: namespaces and Docker's default policy (relaxed to a shared
    /// PID namespace where a fresh /proc cannot be mounted).
    #[default]
    Sandbox,
    /// The container builder runs in is the sandbox: steps run in its own root.
    Container,
}

impl Isolation {
    /// How provenance names it.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Sandbox => "sandbox",
            Isolation::Container => "container",
        }
    }
}

/// How provenance names the relaxed sandbox (BuildKit's term).
pub const NO_PROCESS_SANDBOX: &str = "no-process-sandbox";

/// Run one step; returns the exit and the diff directory (overlay upper format). For a step
/// that failed, the directory is what it left: its upper directory over the view, or with
/// the copy snapshotter its whole root (see [`StepInput::failed_state`]).
pub fn run_step(
    input: StepInput,
    on_line: &mut dyn FnMut(&str),
) -> Result<(Exit, PathBuf), WorkerError> {
    let StepInput {
        view,
        scratch,
        mut spec,
        in_place,
        failed_state,
    } = input;
    let rootfs = match (view.mode(), failed_state) {
        (Snapshotter::Copy, Some(root)) => root,
        _ => view.path(),
    };
    if let Some(kept) = in_place {
        return inplace::run_step(rootfs, view.layer_count(), scratch, &spec, kept, on_line);
    }
    if view.mode() == Snapshotter::Overlay {
        // Mount points come from a skeleton layered on top of the shared snapshots.
        let skeleton = scratch.join("skeleton");
        fs::create_dir_all(&skeleton).map_err(io_at(&skeleton))?;
        make_skeleton(rootfs, &skeleton, &spec)?;
        let (upper, work, merged) = (
            scratch.join("upper"),
            scratch.join("work"),
            scratch.join("merged"),
        );
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).map_err(io_at(d))?;
        }
        let mut lowers = vec![skeleton.clone()];
        lowers.extend(failed_state.map(Path::to_path_buf));
        lowers.extend(view.lowers().iter().cloned());
        spec.root = sandbox::RootMount::Overlay {
            lowers,
            upper: upper.clone(),
            work,
            merged,
            base: view.base.clone(),
            scratch: view.scratch.clone(),
        };
        let exit = sandbox::run(&spec, on_line)?;
        return Ok((exit, upper));
    }
    // Copy: the view is a private directory; mount points are made in it and removed after.
    spec.root = sandbox::RootMount::Bind {
        dir: rootfs.to_path_buf(),
    };
    let created = MountPoints::create(rootfs, &spec)?;
    let result = (|| -> Result<(Exit, PathBuf), WorkerError> {
        let copy = scratch.join("root");
        copy_tree(rootfs, &copy)?;
        let identities = dir_identities(&copy)?;
        spec.root = sandbox::RootMount::Bind { dir: copy.clone() };
        let exit = sandbox::run(&spec, on_line)?;
        if exit != Exit::Code(0) {
            return Ok((exit, copy));
        }
        let diff = scratch.join("diff");
        fs::create_dir_all(&diff).map_err(io_at(&diff))?;
        walk_diff(rootfs, &copy, &diff, Some(&identities))?;
        Ok((exit, diff))
    })();
    created.remove();
    result
}

/// Create the sandbox's mount points in `skeleton`, mirroring the metadata of every existing
/// directory on the way (the topmost layer's metadata is what overlay shows and copies up).
/// Returns the directories it made that the view does not have (relative paths).
pub(crate) fn make_skeleton(
    view: &Path,
    skeleton: &Path,
    spec: &RunSpec,
) -> Result<Vec<PathBuf>, WorkerError> {
    let mut created = Vec::new();
    let files: Vec<String> = spec
        .etc_files
        .iter()
        .map(|(_, t)| t.clone())
        .chain(spec.mounts.iter().filter_map(|m| match m {
            ExtraMount::Bind { source, target, .. } if !source.is_dir() => Some(target.clone()),
            _ => None,
        }))
        .collect();
    for target in sandbox::mount_points(spec) {
        let rel = Path::new(target.trim_start_matches('/'));
        let Ok(resolved) = resolve_in_root(view, rel) else {
            continue;
        };
        let Ok(inner) = resolved.strip_prefix(view) else {
            continue;
        };
        let comps: Vec<_> = inner.components().collect();
        let mut cur = PathBuf::new();
        for (i, c) in comps.iter().enumerate() {
            cur.push(c);
            let dst = skeleton.join(&cur);
            if fs::symlink_metadata(&dst).is_ok() {
                continue;
            }
            let src = view.join(&cur);
            let leaf = i + 1 == comps.len();
            match fs::symlink_metadata(&src) {
                Ok(md) if md.is_dir() => {
                    fs::create_dir(&dst).map_err(io_at(&dst))?;
                    copy_meta(&src, &dst, &md);
                }
                Ok(md) if leaf => {
                    fs::File::create(&dst).map_err(io_at(&dst))?;
                    copy_meta(&src, &dst, &md);
                }
                Ok(_) => break,
                Err(_) if leaf && files.contains(&target) => {
                    fs::File::create(&dst).map_err(io_at(&dst))?;
                }
                Err(_) => {
                    fs::create_dir(&dst).map_err(io_at(&dst))?;
                    created.push(cur.clone());
                }
            }
        }
    }
    // Parent directories' mtimes were touched by creating children: mirror them again.
    for e in walkdir::WalkDir::new(skeleton)
        .min_depth(1)
        .contents_first(true)
        .into_iter()
        .flatten()
    {
        let rel = e.path().strip_prefix(skeleton).unwrap_or(e.path());
        if let Ok(md) = fs::symlink_metadata(view.join(rel)) {
            if md.is_dir() && e.file_type().is_dir() {
                let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
                let _ = nix::sys::stat::utimensat(
                    None,
                    e.path(),
                    &ts,
                    &ts,
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                );
            }
        }
    }
    Ok(created)
}

/// Mount points created in the lower root, to be removed again afterwards.
struct MountPoints {
    created: Vec<PathBuf>,
    parent_times: BTreeMap<PathBuf, i64>,
}

impl MountPoints {
    fn create(root: &Path, spec: &RunSpec) -> Result<MountPoints, WorkerError> {
        let mut mp = MountPoints {
            created: Vec::new(),
            parent_times: BTreeMap::new(),
        };
        let etc_files: Vec<&String> = spec.etc_files.iter().map(|(_, t)| t).collect();
        let bind_files: Vec<String> = spec
            .mounts
            .iter()
            .filter_map(|m| match m {
                ExtraMount::Bind { source, target, .. } if !source.is_dir() => Some(target.clone()),
                _ => None,
            })
            .collect();
        for target in sandbox::mount_points(spec) {
            let is_file = etc_files.contains(&&target) || bind_files.contains(&target);
            let rel = Path::new(target.trim_start_matches('/'));
            let Ok(resolved) = resolve_in_root(root, rel) else {
                continue;
            };
            if fs::symlink_metadata(&resolved).is_ok() {
                continue;
            }
            // Create missing ancestors one by one, remembering each.
            let mut cur = root.to_path_buf();
            let comps: Vec<_> = resolved
                .strip_prefix(root)
                .unwrap_or(rel)
                .components()
                .collect();
            for (i, c) in comps.iter().enumerate() {
                let next = cur.join(c);
                if fs::symlink_metadata(&next).is_err() {
                    if let Ok(md) = fs::metadata(&cur) {
                        mp.parent_times.entry(cur.clone()).or_insert(md.mtime());
                    }
                    if i + 1 == comps.len() && is_file {
                        fs::File::create(&next).map_err(io_at(&next))?;
                    } else {
                        fs::create_dir(&next).map_err(io_at(&next))?;
                    }
                    mp.created.push(next.clone());
                }
                cur = next;
            }
        }
        Ok(mp)
    }

    fn remove(self) {
        for p in self.created.iter().rev() {
            match fs::symlink_metadata(p) {
                Ok(md) if md.is_dir() => {
                    let _ = fs::remove_dir(p);
                }
                Ok(_) => {
                    let _ = fs::remove_file(p);
                }
                Err(_) => {}
            }
        }
        for (p, t) in self.parent_times {
            set_mtime(&p, t);
        }
    }
}

/// Copy a tree with modes, owners, mtimes, symlinks, hardlinks and xattrs.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), WorkerError> {
    let mut links: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut dirs = Vec::new();
    for e in walkdir::WalkDir::new(from).follow_links(false) {
        let e = e.map_err(|e| WorkerError::Io {
            path: from.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let rel = e.path().strip_prefix(from).unwrap_or(e.path());
        let dst = to.join(rel);
        let md = fs::symlink_metadata(e.path()).map_err(io_at(e.path()))?;
        let ft = md.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dst).map_err(io_at(&dst))?;
            dirs.push((dst.clone(), md.clone()));
        } else if ft.is_symlink() {
            symlink(fs::read_link(e.path()).map_err(io_at(e.path()))?, &dst)
                .map_err(io_at(&dst))?;
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    fs::hard_link(first, &dst).map_err(io_at(&dst))?;
                    continue;
                }
                links.insert(key, dst.clone());
            }
            fs::copy(e.path(), &dst).map_err(io_at(&dst))?;
        } else {
            let kind = if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else {
                nix::sys::stat::SFlag::S_IFCHR
            };
            let _ = nix::sys::stat::mknod(
                &dst,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(md.mode() & 0o7777),
                md.rdev(),
            );
        }
        copy_meta(e.path(), &dst, &md);
    }
    for (d, md) in dirs.iter().rev() {
        let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
        let _ = nix::sys::stat::utimensat(
            None,
            d,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
    Ok(())
}

pub(crate) fn copy_meta(src: &Path, dst: &Path, md: &fs::Metadata) {
    let _ = nix::unistd::fchownat(
        None,
        dst,
        Some(md.uid().into()),
        Some(md.gid().into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    );
    if !md.file_type().is_symlink() {
        let _ = fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777));
        if let Ok(names) = xattr::list(src) {
            for n in names {
                if let Ok(Some(v)) = xattr::get(src, &n) {
                    let _ = xattr::set(dst, &n, &v);
                }
            }
        }
    }
    let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    let _ = nix::sys::stat::utimensat(
        None,
        dst,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

fn same_entry(a: &fs::Metadata, b: &fs::Metadata, pa: &Path, pb: &Path) -> bool {
    let same_kind = a.file_type() == b.file_type();
    let base = same_kind && a.mode() == b.mode() && a.uid() == b.uid() && a.gid() == b.gid();
    if !base {
        return false;
    }
    if a.is_dir() {
        return a.mtime() == b.mtime()
            && a.mtime_nsec() == b.mtime_nsec()
            && read_xattrs(pa) == read_xattrs(pb);
    }
    if a.file_type().is_symlink() {
        return fs::read_link(pa).ok() == fs::read_link(pb).ok();
    }
    a.len() == b.len()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.rdev() == b.rdev()
        && read_xattrs(pa) == read_xattrs(pb)
}

/// What tells a directory from one removed and made again in its place: its inode and
/// birth time (an inode number alone is handed out again at once).
pub type DirIdentities = std::collections::HashMap<PathBuf, (u64, Option<(i64, u32)>)>;

/// The identity of every directory under `root`, by relative path.
pub fn dir_identities(root: &Path) -> Result<DirIdentities, WorkerError> {
    let mut out = DirIdentities::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let e = e.map_err(|e| WorkerError::Io {
            path: root.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        if e.file_type().is_dir() {
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap_or(e.path())
                .to_path_buf();
            let ino = walkdir::DirEntryExt::ino(&e);
            out.insert(rel, (ino, inplace::birth_time(e.path())));
        }
    }
    Ok(out)
}

/// Build an overlay-style diff of `after` against `before` into `diff`: changed and new
/// entries are copied (with their parent directories), deleted ones become 0/0 char devices.
/// With `identities` (of `after`'s directories before the step), a directory removed and
/// made again is opaque, as overlay makes it: everything in it is the layer's, and nothing
/// below it is deleted one by one.
pub fn walk_diff(
    before: &Path,
    after: &Path,
    diff: &Path,
    identities: Option<&DirIdentities>,
) -> Result<(), WorkerError> {
    let mut changed: Vec<PathBuf> = Vec::new();
    let mut deleted: Vec<PathBuf> = Vec::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    for e in walkdir::WalkDir::new(after)
        .min_depth(1)
        .follow_links(false)
    {
        let e = e.map_err(|e| WorkerError::Io {
            path: after.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let rel = e
            .path()
            .strip_prefix(after)
            .unwrap_or(e.path())
            .to_path_buf();
        let a = fs::symlink_metadata(e.path()).map_err(io_at(e.path()))?;
        if opaque.iter().any(|o| rel.starts_with(o)) {
            changed.push(rel);
            continue;
        }
        let remade = a.is_dir()
            && identities
                .and_then(|ids| ids.get(&rel))
                .is_some_and(|&(ino, born)| {
                    ino != a.ino() || born != inplace::birth_time(e.path())
                });
        if remade {
            opaque.push(rel.clone());
            changed.push(rel);
            continue;
        }
        let before_path = before.join(&rel);
        let unchanged = fs::symlink_metadata(&before_path)
            .is_ok_and(|b| same_entry(&b, &a, &before_path, e.path()));
        if !unchanged {
            changed.push(rel);
        }
    }
    let mut it = walkdir::WalkDir::new(before)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    while let Some(e) = it.next() {
        let e = e.map_err(|e| WorkerError::Io {
            path: before.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let rel = e
            .path()
            .strip_prefix(before)
            .unwrap_or(e.path())
            .to_path_buf();
        if opaque.iter().any(|o| rel.starts_with(o) && &rel != o) {
            continue;
        }
        match fs::symlink_metadata(after.join(&rel)) {
            Err(_) => {
                deleted.push(rel);
                if e.file_type().is_dir() {
                    it.skip_current_dir();
                }
            }
            Ok(a) if e.file_type().is_dir() && !a.is_dir() => it.skip_current_dir(),
            Ok(_) => {}
        }
    }
    write_diff(after, diff, &changed, &deleted)?;
    for rel in &opaque {
        let d = diff.join(rel);
        xattr::set(&d, USER_OPAQUE_XATTR, b"y").map_err(io_at(&d))?;
    }
    Ok(())
}

/// Make the FIFO or device node `md` describes at `dst`.
pub(crate) fn make_node(dst: &Path, md: &fs::Metadata) -> Result<(), WorkerError> {
    let ft = md.file_type();
    let kind = if ft.is_fifo() {
        nix::sys::stat::SFlag::S_IFIFO
    } else if ft.is_block_device() {
        nix::sys::stat::SFlag::S_IFBLK
    } else {
        nix::sys::stat::SFlag::S_IFCHR
    };
    nix::sys::stat::mknod(
        dst,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(md.mode() & 0o7777),
        md.rdev(),
    )
    .map_err(|e| WorkerError::Io {
        path: dst.to_path_buf(),
        source: io::Error::from(e),
    })
}

/// The marker of a directory that hides everything below it in lower layers, where the
/// `trusted.` namespace cannot be written (an unprivileged container): the layer writer
/// takes it as overlay's `trusted.overlay.opaque`, as overlayfs' `userxattr` mode does.
pub const USER_OPAQUE_XATTR: &str = "user.overlay.opaque";

/// Write an overlay-style diff into `diff`: the `changed` entries of `after` (relative
/// paths) with their parent directories, and a 0/0 character device for each `deleted` one.
pub(crate) fn write_diff(
    after: &Path,
    diff: &Path,
    changed: &[PathBuf],
    deleted: &[PathBuf],
) -> Result<(), WorkerError> {
    let ensure_parents = |rel: &Path| -> Result<(), WorkerError> {
        let mut cur = PathBuf::new();
        for c in rel
            .parent()
            .map(|p| p.components().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            cur.push(c);
            let d = diff.join(&cur);
            if fs::symlink_metadata(&d).is_err() {
                fs::create_dir(&d).map_err(io_at(&d))?;
                let src = after.join(&cur);
                if let Ok(md) = fs::symlink_metadata(&src) {
                    copy_meta(&src, &d, &md);
                }
            }
        }
        Ok(())
    };
    for rel in changed {
        ensure_parents(rel)?;
        let src = after.join(rel);
        let dst = diff.join(rel);
        let md = fs::symlink_metadata(&src).map_err(io_at(&src))?;
        let ft = md.file_type();
        if ft.is_dir() {
            if fs::symlink_metadata(&dst).is_err() {
                fs::create_dir(&dst).map_err(io_at(&dst))?;
            }
        } else if ft.is_symlink() {
            symlink(fs::read_link(&src).map_err(io_at(&src))?, &dst).map_err(io_at(&dst))?;
        } else if ft.is_file() {
            fs::copy(&src, &dst).map_err(io_at(&dst))?;
        } else if ft.is_socket() {
            // Sockets are not part of images.
            continue;
        } else {
            // A FIFO or a device node, as what it is (a 0/0 character device here would
            // read as a whiteout).
            make_node(&dst, &md)?;
        }
        copy_meta(&src, &dst, &md);
    }
    for rel in deleted {
        ensure_parents(rel)?;
        let dst = diff.join(rel);
        match nix::sys::stat::mknod(
            &dst,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        ) {
            Ok(()) => {}
            // A container's device rules refuse even a 0/0 node: an empty file marked as a
            // whiteout says the same to the layer writer.
            Err(nix::errno::Errno::EPERM) => {
                fs::File::create(&dst).map_err(io_at(&dst))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))
                    .map_err(io_at(&dst))?;
                xattr::set(&dst, crate::oci::layer::USER_WHITEOUT_XATTR, b"y")
                    .map_err(io_at(&dst))?;
            }
            Err(e) => {
                return Err(WorkerError::Io {
                    path: dst.clone(),
                    source: io::Error::from(e),
                })
            }
        }
    }
    // Directory mtimes last: creating entries above touched them.
    for rel in changed.iter().chain(deleted) {
        let mut cur = Some(rel.as_path());
        while let Some(p) = cur {
            let src = after.join(p);
            let dst = diff.join(p);
            if let (Ok(md), true) = (fs::symlink_metadata(&src), dst.is_dir()) {
                let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
                let _ = nix::sys::stat::utimensat(
                    None,
                    &dst,
                    &ts,
                    &ts,
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                );
            }
            cur = p.parent().filter(|p| !p.as_os_str().is_empty());
        }
    }
    Ok(())
}

#[cfg(test)]
mod id_mapping_tests {
    use super::*;

    #[test]
    fn ranges_are_found_by_name_or_id_and_mapped_consecutively() {
        let file =
            "other:200000:65536\nci:100000:65536\n# junk\nci:x:1\n1001:300000:1000\nci:1:0\n";
        let found = subordinate_ranges(file, Some("ci"), 1001);
        assert_eq!(
            found,
            vec![
                SubRange {
                    start: 100000,
                    count: 65536
                },
                SubRange {
                    start: 300000,
                    count: 1000
                }
            ]
        );
        assert_eq!(
            map_arguments(1001, &found).join(" "),
            "0 1001 1 1 100000 65536 65537 300000 1000"
        );
        assert!(subordinate_ranges(file, Some("nobody"), 65534).is_empty());
    }

    #[test]
    fn ranges_never_overflow_the_id_space() {
        let file = "ci:4294967000:1000\nci:1:4294967290\nci:10:10\n";
        let found = subordinate_ranges(file, Some("ci"), 5);
        assert_eq!(
            found,
            vec![SubRange {
                start: 1,
                count: 4294967290
            }]
        );
    }
}
