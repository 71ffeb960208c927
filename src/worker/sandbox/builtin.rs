//! The built-in executor: builder itself runs a step's OCI runtime spec.
//!
//! Process layout: builder forks a helper that joins or creates the network namespace and
//! unshares the others, then forks PID 1. PID 1 mounts the root (overlay or a bind of a
//! private copy, `nodev`), the spec's mounts, the masked and read-only paths, and
//! `pivot_root`s into it. It then drops the capabilities the spec does not grant (bounding set
//! first), installs the seccomp filter while it still may, takes the step's user, marks every
//! descriptor but stdio close-on-exec, and execs the command: as in docker, the step's PID 1 is
//! the user's command, whose command line and environment are the step's own, never builder's.
//! The helper waits for it. When builder dies the helper is told (`PR_SET_PDEATHSIG`) and
//! kills PID 1, which takes the whole PID namespace with it: killing builder kills the step,
//! whatever user or set-uid program the step runs as (either would clear a death signal of
//! PID 1's own).
//!
//! Set-up failures are written to a close-on-exec error pipe and never confused with the
//! command's own exit status: an `exit 125` in a step is the step's, not the sandbox's.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{
    chdir, fork, pivot_root, setgid, setgroups, sethostname, setuid, ForkResult, Gid, Uid,
};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::child::{exit_child, kill_descendants, stdio_to, write_fd};
use super::{policy, seccomp, serr, Exit, RootMount, SandboxError};
use crate::worker::syscall::{Host, Syscall};

/// Run `spec` on `root`; `on_line` receives the command's output line by line.
pub fn run(
    spec: &Spec,
    root: &RootMount,
    terminal: Option<RawFd>,
    on_line: &mut dyn FnMut(&str),
) -> Result<Exit, SandboxError> {
    let mut prepared = Prepared::new(spec, root)?;
    prepared.terminal = terminal;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
    // SAFETY: other stages' threads may be running; the child uses what was prepared above
    // and then execs or exits.
    match unsafe { fork() }.map_err(serr("fork"))? {
        ForkResult::Child => {
            drop(out_r);
            drop(err_r);
            let err_fd = err_w.as_raw_fd();
            exit_child(err_fd, helper(&prepared, out_w, &err_w))
        }
        ForkResult::Parent { child } => {
            drop(out_w);
            drop(err_w);
            super::pump_lines(fs::File::from(out_r), on_line);
            let mut setup_error = String::new();
            let _ = fs::File::from(err_r)
                .take(64 * 1024)
                .read_to_string(&mut setup_error);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            let status = status.map_err(serr("wait"))?;
            if !setup_error.is_empty() {
                return Err(SandboxError(setup_error.trim_end().to_string()));
            }
            match status {
                WaitStatus::Exited(_, c) => Ok(Exit::Code(c)),
                WaitStatus::Signaled(_, s, _) => Ok(Exit::Signal(s as i32)),
                other => Err(SandboxError(format!("unexpected wait status {:?}", other))),
            }
        }
    }
}

/// One mount of the spec, ready to perform.
enum Planned {
    Bind {
        source: PathBuf,
        dest: String,
        flags: MsFlags,
    },
    Fs {
        typ: String,
        source: String,
        dest: String,
        flags: MsFlags,
        data: String,
    },
}

/// Split mount options into flags and file-system data; `bind` says whether it is a bind.
fn parse_options(options: &[String]) -> (MsFlags, String, bool) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = false;
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "bind" | "rbind" => bind = true,
            "private" | "rprivate" | "slave" | "rslave" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","), bind)
}

/// Everything computed before forking: C strings, the mount plan, capability sets and the
/// compiled seccomp filter.
struct Prepared {
    root: RootMount,
    mounts: Vec<Planned>,
    masked: Vec<String>,
    readonly: Vec<String>,
    hostname: String,
    /// The network namespace to join (`None` with `new_netns`: a fresh one).
    netns: Option<fs::File>,
    new_netns: bool,
    /// A PID namespace of the step's own (not in the relaxed sandbox).
    new_pidns: bool,
    /// Every device node the step may open is a bind of these; everything else is `nodev`.
    nodev: bool,
    uid: u32,
    gid: u32,
    groups: Vec<Gid>,
    cwd: CString,
    /// The command's candidates on the image's PATH, tried in order after pivot_root.
    exe_candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    bounding_drop: Vec<caps::Capability>,
    permitted: caps::CapsHashSet,
    effective: caps::CapsHashSet,
    inheritable: caps::CapsHashSet,
    filters: Vec<seccompiler::BpfProgram>,
    /// The command's terminal (see [`super::RunSpec::terminal`]).
    terminal: Option<RawFd>,
    /// The spec's rlimits: resource, soft, hard.
    rlimits: Vec<super::Rlimit>,
}

fn cstring(s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError(format!("{:?} contains a NUL byte", s)))
}

fn cap_set(set: &Option<oci_spec::runtime::Capabilities>) -> caps::CapsHashSet {
    set.iter()
        .flatten()
        .filter_map(|c| format!("CAP_{}", c).parse::<caps::Capability>().ok())
        .collect()
}

impl Prepared {
    fn new(spec: &Spec, root: &RootMount) -> Result<Prepared, SandboxError> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| SandboxError("the spec has no process".into()))?;
        let linux = spec.linux().clone().unwrap_or_default();
        let args = process.args().clone().unwrap_or_default();
        let first = args
            .first()
            .ok_or_else(|| SandboxError("empty command".into()))?;
        let env: Vec<String> = process.env().clone().unwrap_or_default();
        let path = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(crate::oci::image::DEFAULT_PATH);
        let exe_candidates = if first.contains('/') {
            vec![cstring(first)?]
        } else {
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| cstring(&format!("{}/{}", d.trim_end_matches('/'), first)))
                .collect::<Result<Vec<_>, _>>()?
        };
        let mut mounts = Vec::new();
        for m in spec.mounts().iter().flatten() {
            let dest = m.destination().display().to_string();
            let options = m.options().clone().unwrap_or_default();
            let (flags, data, bind) = parse_options(&options);
            let typ = m.typ().clone().unwrap_or_default();
            let source = m.source().clone().unwrap_or_default();
            if bind || typ == "bind" {
                mounts.push(Planned::Bind {
                    source,
                    dest,
                    flags,
                });
            } else {
                mounts.push(Planned::Fs {
                    typ,
                    source: source.display().to_string(),
                    dest,
                    flags,
                    data,
                });
            }
        }
        let mut netns = None;
        let mut new_netns = false;
        let new_pidns = linux
            .namespaces()
            .iter()
            .flatten()
            .any(|ns| ns.typ() == LinuxNamespaceType::Pid);
        for ns in linux.namespaces().iter().flatten() {
            if ns.typ() == LinuxNamespaceType::Network {
                match ns.path() {
                    Some(p) => {
                        netns = Some(fs::File::open(p).map_err(|e| {
                            SandboxError(format!("network namespace {}: {}", p.display(), e))
                        })?)
                    }
                    None => new_netns = true,
                }
            }
        }
        let caps = process.capabilities().clone().unwrap_or_default();
        let bounding = cap_set(caps.bounding());
        let current =
            caps::read(None, caps::CapSet::Bounding).map_err(serr("read capabilities"))?;
        // Nothing beyond what builder holds (and this kernel knows) can be granted.
        let granted = |set: &Option<oci_spec::runtime::Capabilities>| -> caps::CapsHashSet {
            cap_set(set).intersection(&current).copied().collect()
        };
        let filters = match linux.seccomp() {
            Some(profile) => seccomp::compile(profile).map_err(|e| SandboxError(e.to_string()))?,
            None => Vec::new(),
        };
        let user = process.user();
        Ok(Prepared {
            terminal: None,
            root: root.clone(),
            mounts,
            masked: linux.masked_paths().clone().unwrap_or_default(),
            readonly: linux.readonly_paths().clone().unwrap_or_default(),
            hostname: spec.hostname().clone().unwrap_or_else(|| "builder".into()),
            netns,
            new_netns,
            new_pidns,
            nodev: denies_devices(&linux),
            uid: user.uid(),
            gid: user.gid(),
            groups: user
                .additional_gids()
                .iter()
                .flatten()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            cwd: cstring(&process.cwd().display().to_string())?,
            exe_candidates,
            argv: args.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?,
            envp: env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?,
            bounding_drop: current.difference(&bounding).copied().collect(),
            permitted: granted(caps.permitted()),
            effective: granted(caps.effective()),
            inheritable: granted(caps.inheritable()),
            filters,
            rlimits: process
                .rlimits()
                .iter()
                .flatten()
                .map(|r| (super::rlimit_resource(r.typ()), r.soft(), r.hard()))
                .collect(),
        })
    }
}

/// Whether the spec's device rules deny every device, which the built-in executor (having
/// no device cgroup of its own) enforces by mounting everything the step can write `nodev`.
fn denies_devices(linux: &oci_spec::runtime::Linux) -> bool {
    linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_ref())
        .is_some_and(|rules| {
            rules.iter().any(|d| {
                !d.allow()
                    && d.major().is_none()
                    && matches!(d.typ(), None | Some(oci_spec::runtime::LinuxDeviceType::A))
            })
        })
}

/// The first child: network namespace, the other namespaces, then PID 1.
fn helper(p: &Prepared, out: OwnedFd, err: &OwnedFd) -> Result<i32, SandboxError> {
    use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
    // Builder's death arrives as SIGHUP, taken with sigwait below (blocked, so it never kills
    // the helper before the helper has killed PID 1).
    let mut watched = SigSet::empty();
    watched.add(Signal::SIGHUP);
    watched.add(Signal::SIGCHLD);
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&watched), None)
        .map_err(serr("block signals"))?;
    let builder = nix::unistd::getppid();
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP);
    }
    if nix::unistd::getppid() != builder {
        return Err(SandboxError(
            "builder exited before the step started".into(),
        ));
    }
    if let Some(ns) = &p.netns {
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(serr("join the step's network namespace"))?;
    }
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if p.new_pidns {
        flags |= CloneFlags::CLONE_NEWPID;
    } else {
        // No PID namespace ends the step's processes with it: they are orphaned to this
        // helper, which kills them once the command is done.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
        }
    }
    if p.new_netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(serr("unshare namespaces (builder needs root for RUN)"))?;
    match unsafe { fork() }.map_err(serr("fork"))? {
        ForkResult::Child => {
            // The command must not inherit the helper's blocked signals.
            let _ = nix::sys::signal::sigprocmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            );
            exit_child(err.as_raw_fd(), init(p, out))
        }
        ForkResult::Parent { child } => {
            drop(out);
            let code = loop {
                match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, c)) => break c,
                    Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(SandboxError(format!("wait: {}", e))),
                }
                if let Ok(Signal::SIGHUP) = watched.wait() {
                    let _ = kill(child, Signal::SIGKILL);
                    if !p.new_pidns {
                        kill_descendants();
                    }
                }
            };
            if !p.new_pidns {
                kill_descendants();
            }
            Ok(code)
        }
    }
}

fn mkdir_p(p: &Path) -> Result<(), SandboxError> {
    fs::create_dir_all(p).map_err(|e| SandboxError(format!("mkdir {}: {}", p.display(), e)))
}

fn touch(p: &Path) -> Result<(), SandboxError> {
    if fs::symlink_metadata(p).is_err() {
        if let Some(d) = p.parent() {
            mkdir_p(d)?;
        }
        fs::File::create(p).map_err(|e| SandboxError(format!("create {}: {}", p.display(), e)))?;
    }
    Ok(())
}

fn mnt(
    sys: &dyn Syscall,
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    sys.mount(src, target, fstype, flags, data).map_err(|e| {
        SandboxError(format!(
            "mount {} on {}: {}",
            fstype.or(src).unwrap_or("?"),
            target.display(),
            e
        ))
    })
}

/// The per-mount flags a bind mount at `target` already carries; a remount must keep them
/// (in a user namespace the kernel refuses to clear locked ones).
fn current_flags(target: &Path) -> MsFlags {
    let Ok(st) = nix::sys::statvfs::statvfs(target) else {
        return MsFlags::empty();
    };
    use nix::sys::statvfs::FsFlags;
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (from, to) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(from) {
            out |= to;
        }
    }
    out
}

/// Bind `source` on `target`, then apply `flags` (read-only, nosuid, nodev, noexec).
fn bind(
    sys: &dyn Syscall,
    source: &Path,
    target: &Path,
    flags: MsFlags,
) -> Result<(), SandboxError> {
    let s = source.display().to_string();
    mnt(
        sys,
        Some(&s),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    if !flags.is_empty() {
        let keep = current_flags(target);
        mnt(
            sys,
            None,
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags | keep,
            None,
        )?;
    }
    Ok(())
}

/// A path inside the new root, resolved so symlinks in the image cannot point mounts outside.
fn inside(root: &Path, image_path: &str) -> Result<PathBuf, SandboxError> {
    crate::oci::unpack::resolve_in_root(root, Path::new(image_path.trim_start_matches('/')))
        .map_err(|e| SandboxError(format!("{}: {}", image_path, e)))
}

fn mount_root(sys: &dyn Syscall, p: &Prepared) -> Result<(), SandboxError> {
    match &p.root {
        RootMount::Overlay {
            lowers,
            upper,
            work,
            merged,
            base,
            scratch,
        } => crate::worker::snapshots::mount_overlay(
            lowers,
            Some((upper, work)),
            merged,
            false,
            p.nodev,
            base,
            scratch,
        )
        .map_err(|e| SandboxError(e.to_string())),
        RootMount::Bind { dir } => {
            let flags = if p.nodev {
                MsFlags::MS_NODEV
            } else {
                MsFlags::empty()
            };
            bind(sys, dir, dir, flags)
        }
    }
}

/// The standard device nodes and links of /dev, once its tmpfs is mounted.
fn populate_dev(sys: &dyn Syscall, dev: &Path) -> Result<(), SandboxError> {
    for name in policy::DEVICES {
        let t = dev.join(name);
        touch(&t)?;
        mnt(
            sys,
            Some(&format!("/dev/{}", name)),
            &t,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    Ok(())
}

/// Perform one planned mount inside `root`.
fn perform(sys: &dyn Syscall, root: &Path, m: &Planned, nodev: bool) -> Result<(), SandboxError> {
    match m {
        Planned::Bind {
            source,
            dest,
            flags,
        } => {
            let t = inside(root, dest)?;
            let md = fs::metadata(source)
                .map_err(|e| SandboxError(format!("bind source {}: {}", source.display(), e)))?;
            // A socket is an ssh mount's relay.
            if md.is_dir() {
                mkdir_p(&t)?;
            } else if md.is_file() || std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()) {
                touch(&t)?;
            } else {
                return Err(SandboxError(format!(
                    "bind source {} is not a regular file, directory or socket",
                    source.display()
                )));
            }
            bind(sys, source, &t, *flags)
        }
        Planned::Fs {
            typ,
            source,
            dest,
            flags,
            data,
        } => {
            let t = inside(root, dest)?;
            mkdir_p(&t)?;
            let data = (!data.is_empty()).then_some(data.as_str());
            // The device rule, enforced: nodes made in a writable tmpfs (/dev included, whose
            // standard devices are binds of the host's) cannot be opened.
            let flags = if nodev && typ == "tmpfs" {
                *flags | MsFlags::MS_NODEV
            } else {
                *flags
            };
            match sys.mount(Some(source.as_str()), &t, Some(typ.as_str()), flags, data) {
                Ok(()) => {
                    if typ == "tmpfs" && dest == "/dev" {
                        populate_dev(sys, &t)?;
                    }
                    Ok(())
                }
                // In a rootless user namespace sysfs may not be mountable: bind the host's,
                // read-only, or go without it (documented).
                Err(_) if typ == "sysfs" => {
                    if bind(sys, Path::new("/sys"), &t, flags | MsFlags::MS_RDONLY).is_err() {
                        let _ = sys.umount(&t, MntFlags::MNT_DETACH);
                    }
                    Ok(())
                }
                // Optional file systems (devpts, mqueue) a user namespace may refuse.
                Err(_) if typ == "devpts" || typ == "mqueue" => Ok(()),
                Err(e) => Err(SandboxError(format!("mount {} on {}: {}", typ, dest, e))),
            }
        }
    }
}

/// Hide masked paths and make read-only paths read-only (after /proc and /sys exist).
fn restrict_paths(
    sys: &dyn Syscall,
    root: &Path,
    masked: &[String],
    readonly: &[String],
) -> Result<(), SandboxError> {
    for path in masked {
        let Ok(t) = inside(root, path) else { continue };
        match fs::symlink_metadata(&t) {
            Ok(md) if md.is_dir() => mnt(
                sys,
                Some("tmpfs"),
                &t,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )?,
            Ok(_) => mnt(sys, Some("/dev/null"), &t, None, MsFlags::MS_BIND, None)?,
            Err(_) => continue,
        }
    }
    for path in readonly {
        let Ok(t) = inside(root, path) else { continue };
        if fs::symlink_metadata(&t).is_err() {
            continue;
        }
        bind(
            sys,
            &t,
            &t,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )?;
    }
    Ok(())
}

/// PID 1 of the step.
fn init(p: &Prepared, out: OwnedFd) -> Result<i32, SandboxError> {
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let sys = &Host;
    mnt(
        sys,
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    mount_root(sys, p)?;
    let root = p.root.target().to_path_buf();
    for m in &p.mounts {
        perform(sys, &root, m, p.nodev)?;
    }
    restrict_paths(sys, &root, &p.masked, &p.readonly)?;
    // Into the new root; the old root is detached and gone.
    chdir(&root).map_err(serr("chdir to the new root"))?;
    pivot_root(".", ".").map_err(serr("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(serr("detach the old root"))?;
    chdir("/").map_err(serr("chdir /"))?;
    sethostname(&p.hostname).map_err(serr("sethostname"))?;
    if p.new_netns {
        super::network::loopback_up();
    }
    if let Some(tty) = p.terminal {
        // A session of its own, with the terminal as its controlling terminal: a shell's
        // job control and ^C stay inside.
        nix::unistd::setsid().map_err(serr("setsid"))?;
        if unsafe { libc::ioctl(tty, libc::TIOCSCTTY as _, 0) } != 0 {
            return Err(SandboxError(format!(
                "set the controlling terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
        unsafe {
            libc::dup2(tty, 0);
            libc::dup2(tty, 1);
            libc::dup2(tty, 2);
        }
    } else {
        stdio_to(out.as_raw_fd());
    }
    drop(out);
    // Nothing but stdio crosses the exec: not builder's descriptors, not what builder
    // inherited. The error pipe stays open until the exec succeeds.
    super::close_descriptors_from_3(true);
    // Only a failed exec returns: the command's own failure, reported as the shell would.
    let errno = exec_command(p)?;
    let name = p
        .argv
        .first()
        .map(|a| a.to_string_lossy())
        .unwrap_or_default();
    write_fd(
        2,
        &format!("builder sandbox: exec {}: {}\n", name, errno.desc()),
    );
    Ok(if errno == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    })
}

/// Apply the spec's process settings and exec. Returns the errno of a failed exec, or a
/// set-up error.
fn exec_command(p: &Prepared) -> Result<nix::errno::Errno, SandboxError> {
    use caps::CapSet;
    // While CAP_SYS_RESOURCE is held (a hard limit may be raised), as runc does.
    super::set_rlimits(&p.rlimits)?;
    for c in &p.bounding_drop {
        caps::drop(None, CapSet::Bounding, *c).map_err(serr("drop a capability"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(serr("clear ambient capabilities"))?;
    caps::set(None, CapSet::Inheritable, &p.inheritable)
        .map_err(serr("inheritable capabilities"))?;
    // While CAP_SYS_ADMIN is still held; the filter allows what follows.
    seccomp::apply(&p.filters).map_err(|e| SandboxError(e.to_string()))?;
    match setgroups(&p.groups) {
        // A rootless user namespace denies setgroups: the step keeps no supplementary groups.
        Err(nix::errno::Errno::EPERM) if crate::worker::rootless() => {}
        Err(e) => return Err(SandboxError(format!("setgroups: {}", e))),
        Ok(()) => {}
    }
    let unmapped = |what: &str, id: u32, e: nix::errno::Errno| {
        use crate::worker::IdMapping;
        match (e, crate::worker::id_mapping()) {
            (nix::errno::Errno::EINVAL, IdMapping::Single) => SandboxError(format!(
                "{} {} is not available in rootless mode: only your own uid is mapped (as 0); to map every id, {}",
                what,
                id,
                crate::worker::RANGE_HINT
            )),
            (nix::errno::Errno::EINVAL, IdMapping::Ranges { uids, gids }) => SandboxError(format!(
                "{} {} is not available in rootless mode: your subordinate ranges map ids 0 to {} (users) and 0 to {} (groups); add a larger range to /etc/subuid and /etc/subgid",
                what, id, uids, gids
            )),
            _ => SandboxError(format!("{} {}: {}", what, id, e)),
        }
    };
    setgid(Gid::from_raw(p.gid)).map_err(|e| unmapped("group", p.gid, e))?;
    setuid(Uid::from_raw(p.uid)).map_err(|e| unmapped("user", p.uid, e))?;
    if p.uid == 0 {
        // A non-root user lost permitted and effective capabilities with setuid already.
        caps::set(None, CapSet::Effective, &p.effective).map_err(serr("effective capabilities"))?;
        caps::set(None, CapSet::Permitted, &p.permitted).map_err(serr("permitted capabilities"))?;
    }
    if let Err(e) = nix::unistd::chdir(p.cwd.as_c_str()) {
        return Err(SandboxError(format!(
            "working directory {}: {}",
            p.cwd.to_string_lossy(),
            e
        )));
    }
    unsafe {
        libc::umask(0o022);
    }
    // execvpe's search, on the image's PATH rather than builder's.
    let mut last = nix::errno::Errno::ENOENT;
    for exe in &p.exe_candidates {
        let Err(e) = nix::unistd::execve(exe, &p.argv, &p.envp);
        match e {
            nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR => {}
            other => last = other,
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::syscall::{Call, Recorder};
    use nix::errno::Errno;

    fn mounts(sys: &Recorder) -> Vec<(Option<String>, PathBuf, Option<String>, MsFlags)> {
        sys.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    ..
                } => Some((source, target, fstype, flags)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_bind_is_made_then_remounted_with_its_flags_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let src = tempfile::NamedTempFile::new().unwrap();
        // A link in the image is followed inside the root, never to the host's /real.
        fs::create_dir(root.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/real", root.path().join("etc")).unwrap();
        let sys = Recorder::default();
        let planned = Planned::Bind {
            source: src.path().to_path_buf(),
            dest: "/etc/secret".into(),
            flags: MsFlags::MS_RDONLY,
        };
        perform(&sys, root.path(), &planned, false).unwrap();
        let target = root.path().join("real/secret");
        assert!(target.is_file(), "the mount point is made in the root");
        let m = mounts(&sys);
        assert_eq!(m[0].1, target);
        assert_eq!(m[0].3, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(m[1]
            .3
            .contains(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY));
    }

    #[test]
    fn devices_are_nodev_tmpfs_with_the_standard_nodes_bound() {
        let root = tempfile::tempdir().unwrap();
        let sys = Recorder::default();
        let dev = Planned::Fs {
            typ: "tmpfs".into(),
            source: "tmpfs".into(),
            dest: "/dev".into(),
            flags: MsFlags::MS_NOSUID,
            data: "mode=755".into(),
        };
        perform(&sys, root.path(), &dev, true).unwrap();
        let m = mounts(&sys);
        assert_eq!(m[0].2.as_deref(), Some("tmpfs"));
        assert_eq!(m[0].3, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        let bound: Vec<String> = m[1..].iter().filter_map(|x| x.0.clone()).collect();
        let expected: Vec<String> = policy::DEVICES
            .iter()
            .map(|d| format!("/dev/{d}"))
            .collect();
        assert_eq!(bound, expected);
        assert_eq!(
            fs::read_link(root.path().join("dev/fd")).unwrap(),
            Path::new("/proc/self/fd")
        );
    }

    #[test]
    fn optional_file_systems_may_be_refused() {
        let root = tempfile::tempdir().unwrap();
        let fs_at = |typ: &str, dest: &str| Planned::Fs {
            typ: typ.into(),
            source: typ.into(),
            dest: dest.into(),
            flags: MsFlags::empty(),
            data: String::new(),
        };
        // sysfs refused: the host's /sys bound read-only instead.
        let sys = Recorder::default().fail("fstype: Some(\"sysfs\")", Errno::EPERM);
        perform(&sys, root.path(), &fs_at("sysfs", "/sys"), false).unwrap();
        let m = mounts(&sys);
        assert_eq!(m[1].0.as_deref(), Some("/sys"));
        // devpts refused: no /dev/pts, no failure; proc refused: the step fails.
        let sys = Recorder::default().fail("fstype: Some(\"devpts\")", Errno::EPERM);
        perform(&sys, root.path(), &fs_at("devpts", "/dev/pts"), false).unwrap();
        let sys = Recorder::default().fail("fstype: Some(\"proc\")", Errno::EPERM);
        let e = perform(&sys, root.path(), &fs_at("proc", "/proc"), false).unwrap_err();
        assert!(e.to_string().contains("mount proc on /proc"), "{e}");
    }

    #[test]
    fn masked_paths_are_hidden_and_readonly_paths_remounted() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("proc/acpi")).unwrap();
        fs::write(root.path().join("proc/kcore"), "").unwrap();
        fs::create_dir_all(root.path().join("proc/sys")).unwrap();
        let sys = Recorder::default();
        restrict_paths(
            &sys,
            root.path(),
            &[
                "/proc/acpi".into(),
                "/proc/kcore".into(),
                "/proc/missing".into(),
            ],
            &["/proc/sys".into()],
        )
        .unwrap();
        let m = mounts(&sys);
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(
            (m[0].2.as_deref(), &m[0].1),
            (Some("tmpfs"), &root.path().join("proc/acpi"))
        );
        assert!(m[0].3.contains(MsFlags::MS_RDONLY));
        assert_eq!(
            (m[1].0.as_deref(), &m[1].1),
            (Some("/dev/null"), &root.path().join("proc/kcore"))
        );
        assert_eq!(m[2].1, root.path().join("proc/sys"));
        assert!(m[3]
            .3
            .contains(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC));
    }
}
