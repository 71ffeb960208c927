//! The RUN sandbox. A step runs in new mount, PID, IPC and UTS namespaces (and a new network
//! namespace for `--network=none`). Everything is mounted inside the step's own mount
//! namespace: the root filesystem (overlay or a bind of a private copy), a fresh /proc, a
//! minimal /dev, a read-only /sys, resolv.conf, hosts and hostname. When the step's PID 1
//! exits, the kernel kills every process left in its PID namespace and drops every mount of
//! its mount namespace, so a finished, failed or killed step leaves nothing on the host.
//!
//! Process layout: builder forks a helper that unshares the namespaces and forks PID 1; PID 1
//! sets up the root, `pivot_root`s into it and forks the command, then reaps zombies until the
//! command exits and exits with its status. Both helpers die with their parent
//! (`PR_SET_PDEATHSIG`), so killing builder kills the step.

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{
    chdir, execve, fork, pivot_root, setgid, setgroups, sethostname, setuid, ForkResult, Gid, Pid,
    Uid,
};

/// How the step's root filesystem is provided.
#[derive(Debug, Clone)]
pub enum RootMount {
    /// overlayfs: read-only lowers (top first), a fresh upper and work dir.
    Overlay {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        merged: PathBuf,
        /// Lowers under it are named relative to it in the mount options.
        base: PathBuf,
    },
    /// A private writable copy, bind-mounted onto itself.
    Bind { dir: PathBuf },
}

impl RootMount {
    fn target(&self) -> &Path {
        match self {
            RootMount::Overlay { merged, .. } => merged,
            RootMount::Bind { dir } => dir,
        }
    }
}

/// One extra mount for the step (RUN --mount), resolved to host paths.
#[derive(Debug, Clone)]
pub enum ExtraMount {
    /// Bind `source` at `target` (absolute in the image).
    Bind {
        source: PathBuf,
        target: String,
        readonly: bool,
    },
    Tmpfs {
        target: String,
        size: Option<u64>,
    },
}

/// Everything the sandbox needs to run one command.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub root: RootMount,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub hostname: String,
    pub isolate_network: bool,
    /// Host files bind-mounted read-only over /etc/resolv.conf, /etc/hosts, /etc/hostname.
    pub etc_files: Vec<(PathBuf, String)>,
    pub mounts: Vec<ExtraMount>,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// A sandbox that could not start (as opposed to a command that failed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SandboxError(pub String);

fn serr<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> SandboxError + '_ {
    move |e| SandboxError(format!("{}: {}", what, e))
}

/// Paths created in the root only to serve as mount points; the caller removes them from the
/// step's diff.
pub fn mount_points(spec: &RunSpec) -> Vec<String> {
    let mut v: Vec<String> = vec!["/proc".into(), "/dev".into(), "/sys".into()];
    for (_, t) in &spec.etc_files {
        v.push(t.clone());
    }
    for m in &spec.mounts {
        match m {
            ExtraMount::Bind { target, .. } | ExtraMount::Tmpfs { target, .. } => {
                v.push(target.clone())
            }
        }
    }
    v
}

/// Run the command; `on_line` receives its output (stdout and stderr merged) line by line.
pub fn run(spec: &RunSpec, on_line: &mut dyn FnMut(&str)) -> Result<Exit, SandboxError> {
    let prepared = Prepared::new(spec)?;
    let (read_end, write_end) = nix::unistd::pipe().map_err(serr("pipe"))?;
    // SAFETY: other stages' threads may be running; the child uses only what was prepared
    // above (no allocation on the success path) and then execs or exits.
    match unsafe { fork() }.map_err(serr("fork"))? {
        ForkResult::Child => {
            drop(read_end);
            exit_child(helper(&prepared, write_end))
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let file = fs::File::from(read_end);
            let mut reader = BufReader::new(file);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        on_line(line.trim_end_matches('\n'));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            match status.map_err(serr("wait"))? {
                WaitStatus::Exited(_, 125) => Err(SandboxError(
                    "the step could not start (see the lines above)".into(),
                )),
                WaitStatus::Exited(_, c) => Ok(Exit::Code(c)),
                WaitStatus::Signaled(_, s, _) => Ok(Exit::Signal(s as i32)),
                other => Err(SandboxError(format!("unexpected wait status {:?}", other))),
            }
        }
    }
}

/// Write a message to stderr from a forked child without std's stderr lock (another thread
/// of builder may have held it at fork time).
/// End a forked child: its exit code, or 125 (docker's "the runtime failed") after saying why.
fn exit_child(outcome: Result<i32, SandboxError>) -> ! {
    let code = match outcome {
        Ok(c) => c,
        Err(e) => {
            child_message(&format!("builder sandbox: {}\n", e));
            125
        }
    };
    unsafe { libc::_exit(code) }
}

fn child_message(msg: &str) {
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// C strings and paths computed before forking.
struct Prepared {
    spec: RunSpec,
    argv: Vec<CString>,
    envp: Vec<CString>,
    exe: CString,
}

impl Prepared {
    fn new(spec: &RunSpec) -> Result<Prepared, SandboxError> {
        let cs = |s: &str| {
            CString::new(s).map_err(|_| SandboxError(format!("{:?} contains a NUL byte", s)))
        };
        let argv = spec
            .argv
            .iter()
            .map(|a| cs(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| cs(&format!("{}={}", k, v)))
            .collect::<Result<Vec<_>, _>>()?;
        let first = spec
            .argv
            .first()
            .ok_or_else(|| SandboxError("empty command".into()))?;
        let exe = cs(&resolve_exe(spec.root.target(), first, &spec.env))?;
        Ok(Prepared {
            spec: spec.clone(),
            argv,
            envp,
            exe,
        })
    }
}

/// Find `name` on the image's PATH (inside the root), as the exec in the sandbox will.
fn resolve_exe(root: &Path, name: &str, env: &[(String, String)]) -> String {
    if name.contains('/') {
        return name.to_string();
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let rel = Path::new(dir.trim_start_matches('/')).join(name);
        if let Ok(p) = crate::oci::unpack::resolve_in_root(root, &rel) {
            if p.is_file() {
                return format!("{}/{}", dir.trim_end_matches('/'), name);
            }
        }
    }
    name.to_string()
}

/// The first child: unshare, then fork PID 1 and pass its exit code on.
fn helper(p: &Prepared, out: OwnedFd) -> Result<i32, SandboxError> {
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if p.spec.isolate_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(serr("unshare namespaces (builder needs root for RUN)"))?;
    match unsafe { fork() }.map_err(serr("fork"))? {
        ForkResult::Child => exit_child(init(p, out)),
        ForkResult::Parent { child } => {
            drop(out);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, c)) => return Ok(c),
                    Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_) => continue,
                    Err(e) => return Err(SandboxError(format!("wait: {}", e))),
                }
            }
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
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        SandboxError(format!(
            "mount {} on {}: {}",
            fstype.or(src).unwrap_or("?"),
            target.display(),
            e
        ))
    })
}

/// A path inside the new root, resolved so symlinks in the image cannot point mounts outside.
fn inside(root: &Path, image_path: &str) -> Result<PathBuf, SandboxError> {
    crate::oci::unpack::resolve_in_root(root, Path::new(image_path.trim_start_matches('/')))
        .map_err(|e| SandboxError(format!("{}: {}", image_path, e)))
}

/// PID 1 of the step.
fn init(p: &Prepared, out: OwnedFd) -> Result<i32, SandboxError> {
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let spec = &p.spec;
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let root = spec.root.target().to_path_buf();
    match &spec.root {
        RootMount::Overlay {
            lowers,
            upper,
            work,
            merged,
            base,
        } => {
            let lower = crate::worker::snapshots::lowerdir_option(lowers, base)
                .map_err(|e| SandboxError(e.to_string()))?;
            let data = format!(
                "{},upperdir={},workdir={}",
                lower,
                upper.display(),
                work.display()
            );
            chdir(base.as_path()).map_err(serr("chdir to the snapshot directory"))?;
            mnt(
                Some("overlay"),
                merged,
                Some("overlay"),
                MsFlags::empty(),
                Some(&data),
            )?;
        }
        RootMount::Bind { dir } => {
            let d = dir.display().to_string();
            mnt(
                Some(&d),
                dir,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
        }
    }
    // /proc for the new PID namespace.
    let proc_dir = inside(&root, "/proc")?;
    mkdir_p(&proc_dir)?;
    mnt(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    // A minimal /dev.
    let dev = inside(&root, "/dev")?;
    mkdir_p(&dev)?;
    mnt(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let t = dev.join(name);
        touch(&t)?;
        let host = format!("/dev/{}", name);
        mnt(Some(&host), &t, None, MsFlags::MS_BIND, None)?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    let _ = mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    mnt(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    // Read-only /sys.
    let sys = inside(&root, "/sys")?;
    mkdir_p(&sys)?;
    if mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .is_err()
    {
        // A read-only bind of the host's /sys instead; in a rootless user namespace neither
        // may be allowed, and the step runs without /sys (documented).
        let bound = mount(
            Some("/sys"),
            &sys,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .is_ok();
        if bound
            && mount(
                None::<&str>,
                &sys,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .is_err()
        {
            let _ = umount2(&sys, MntFlags::MNT_DETACH);
        }
    }
    // resolv.conf, hosts, hostname: provided, never captured.
    for (host, target) in &spec.etc_files {
        let t = inside(&root, target)?;
        touch(&t)?;
        let h = host.display().to_string();
        mnt(Some(&h), &t, None, MsFlags::MS_BIND, None)?;
        let _ = mount(
            None::<&str>,
            &t,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
    }
    // RUN --mount.
    for m in &spec.mounts {
        match m {
            ExtraMount::Bind {
                source,
                target,
                readonly,
            } => {
                let t = inside(&root, target)?;
                if source.is_dir() {
                    mkdir_p(&t)?;
                } else {
                    touch(&t)?;
                }
                let s = source.display().to_string();
                mnt(Some(&s), &t, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
                if *readonly {
                    mnt(
                        None,
                        &t,
                        None,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None,
                    )?;
                }
            }
            ExtraMount::Tmpfs { target, size } => {
                let t = inside(&root, target)?;
                mkdir_p(&t)?;
                let data = size.map(|s| format!("size={}", s));
                mnt(
                    Some("tmpfs"),
                    &t,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    data.as_deref(),
                )?;
            }
        }
    }
    // Into the new root; the old root is detached and gone.
    chdir(&root).map_err(serr("chdir to the new root"))?;
    pivot_root(".", ".").map_err(serr("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(serr("detach the old root"))?;
    chdir("/").map_err(serr("chdir /"))?;
    sethostname(&spec.hostname).map_err(serr("sethostname"))?;
    if spec.isolate_network {
        loopback_up();
    }
    match unsafe { fork() }.map_err(serr("fork"))? {
        ForkResult::Child => {
            let fd = out.as_raw_fd();
            unsafe {
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
                let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                if devnull >= 0 {
                    libc::dup2(devnull, 0);
                }
            }
            drop(out);
            let err = exec_command(p);
            child_message(&format!("builder sandbox: {}\n", err));
            unsafe {
                libc::_exit(if err.0.contains("No such file") {
                    127
                } else {
                    126
                })
            }
        }
        ForkResult::Parent { child } => {
            drop(out);
            reap_until(child)
        }
    }
}

/// Drop privileges to the step's user and exec.
fn exec_command(p: &Prepared) -> SandboxError {
    let spec = &p.spec;
    let groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    match setgroups(&groups) {
        // A rootless user namespace denies setgroups: the step keeps no supplementary groups.
        Err(nix::errno::Errno::EPERM) if crate::worker::rootless() => {}
        Err(e) => return SandboxError(format!("setgroups: {}", e)),
        Ok(()) => {}
    }
    let unmapped = |what: &str, id: u32, e: nix::errno::Errno| {
        if e == nix::errno::Errno::EINVAL && crate::worker::rootless() {
            SandboxError(format!("{} {} is not available in rootless mode (only id 0 is mapped; run builder as root for USER with other ids)", what, id))
        } else {
            SandboxError(format!("{} {}: {}", what, id, e))
        }
    };
    if let Err(e) = setgid(Gid::from_raw(spec.gid)) {
        return unmapped("group", spec.gid, e);
    }
    if let Err(e) = setuid(Uid::from_raw(spec.uid)) {
        return unmapped("user", spec.uid, e);
    }
    if let Err(e) = chdir(spec.cwd.as_str()) {
        return SandboxError(format!("working directory {}: {}", spec.cwd, e));
    }
    unsafe {
        libc::umask(0o022);
    }
    match execve(&p.exe, &p.argv, &p.envp) {
        Err(e) => SandboxError(format!("exec {}: {}", p.exe.to_string_lossy(), e.desc())),
        Ok(_) => SandboxError("exec returned".into()),
    }
}

/// PID 1's duty: reap every child; return when the command itself exits.
fn reap_until(cmd: Pid) -> Result<i32, SandboxError> {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, c)) if pid == cmd => return Ok(c),
            Ok(WaitStatus::Signaled(pid, s, _)) if pid == cmd => return Ok(128 + s as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError(format!("wait: {}", e))),
        }
    }
}

/// Bring `lo` up in a fresh network namespace.
fn loopback_up() {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(fd);
    }
}

/// Signal numbers as names for messages.
pub fn signal_name(s: i32) -> String {
    Signal::try_from(s)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {}", s))
}
