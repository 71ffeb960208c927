//! The RUN sandbox. A step is described once, as an OCI runtime spec ([`policy`]: Docker's
//! default capabilities, seccomp profile, masked and read-only paths, namespaces, a minimal
//! /dev), and run by one of two executors that both honour that spec:
//! - [`builtin`]: builder forks, unshares the namespaces and applies the spec itself (caps
//!   through the `caps` crate, seccomp compiled by `seccompiler`). No external program.
//! - [`runtime`]: an OCI runtime (`--runtime runc|crun|runsc|PATH`) is handed a bundle whose
//!   config.json is the same spec.
//!
//! The network ([`network`]): `default` is a network namespace of the step's own whose only
//! way out is a user-mode stack (slirp4netns or pasta) that cannot reach the host's loopback;
//! `none` has loopback only; `host` (gated by `--allow network.host`) shares the host's.
//!
//! When a step's PID 1 exits, the kernel kills every process left in its PID namespace and
//! drops every mount of its mount namespace, so a finished, failed or killed step leaves
//! nothing on the host. A sandbox that could not be set up is reported as a [`SandboxError`]
//! through a channel of its own, never through the step's exit status.

pub mod builtin;
pub mod child;
pub mod emulation;
pub mod network;
pub mod policy;
pub mod runtime;
pub mod seccomp;

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

/// Close, or with `cloexec` mark close-on-exec, every descriptor from 3 up: what builder
/// inherited from whoever started it (a CI agent's or a shell's open directories and files)
/// must never reach a step. `close_range` where the kernel has it (5.9, 5.11 for the
/// close-on-exec form), else one `fcntl` or `close` per possible descriptor.
pub fn close_descriptors_from_3(cloexec: bool) {
    let flags = if cloexec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: close_range takes no pointers; every descriptor from 3 up is given up on purpose.
    let done = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, flags) } == 0;
    if done {
        return;
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur.min(1 << 20) as i32
    } else {
        1 << 16
    };
    for fd in 3..limit {
        // SAFETY: as above, one descriptor at a time; EBADF for the closed ones is expected.
        unsafe {
            if cloexec {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            } else {
                libc::close(fd);
            }
        }
    }
}

/// One resource limit: the kernel's resource, soft, hard.
pub type Rlimit = (libc::__rlimit_resource_t, u64, u64);

/// The kernel's resource for an OCI rlimit type.
pub fn rlimit_resource(t: oci_spec::runtime::PosixRlimitType) -> libc::__rlimit_resource_t {
    use oci_spec::runtime::PosixRlimitType as T;
    match t {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// The OCI rlimit type of a `--ulimit` (docker's name, upper-cased after `RLIMIT_`).
pub fn rlimit_type(u: &crate::plan::Ulimit) -> Option<oci_spec::runtime::PosixRlimitType> {
    format!("RLIMIT_{}", u.name.to_uppercase()).parse().ok()
}

/// `--ulimit`s as the kernel's resources.
pub fn rlimits_of(limits: &crate::plan::RunLimits) -> Vec<Rlimit> {
    limits
        .ulimits
        .iter()
        .filter_map(|u| {
            let (soft, hard) = u.values();
            Some((rlimit_resource(rlimit_type(u)?), soft, hard))
        })
        .collect()
}

/// Set the process's resource limits (in a step's process, before it drops privileges).
pub fn set_rlimits(limits: &[Rlimit]) -> Result<(), SandboxError> {
    for (resource, soft, hard) in limits {
        let limit = libc::rlimit {
            rlim_cur: *soft,
            rlim_max: *hard,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(*resource, &limit) } != 0 {
            return Err(SandboxError(format!(
                "--ulimit: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

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
        /// Where a stack too deep for one overlay is flattened (beside `base`'s filesystem).
        scratch: PathBuf,
    },
    /// A private writable copy, bind-mounted onto itself.
    Bind { dir: PathBuf },
}

impl RootMount {
    /// The directory that becomes the step's `/`.
    pub fn target(&self) -> &Path {
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

/// The step's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// Its own namespace, out through a user-mode stack (`--network=default`).
    Private,
    /// Its own namespace with loopback only (`--network=none`).
    Loopback,
    /// The host's namespace (`--network=host`, an entitlement).
    Host,
}

/// Who runs the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executor {
    /// builder itself.
    Builtin,
    /// An OCI runtime binary (runc, crun, runsc or a path).
    Runtime(PathBuf),
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
    pub network: NetworkMode,
    /// `RUN --security=insecure`: every capability, no seccomp, no masked paths.
    pub insecure: bool,
    /// Host files bind-mounted read-only over /etc/resolv.conf, /etc/hosts, /etc/hostname.
    pub etc_files: Vec<(PathBuf, String)>,
    pub mounts: Vec<ExtraMount>,
    pub executor: Executor,
    /// A PID namespace of the step's own with a fresh /proc; `false` is the relaxed sandbox
    /// (the caller's PID namespace, its /proc bound read-only) where a fresh /proc cannot be
    /// mounted.
    pub process_sandbox: bool,
    /// A terminal (a pty's other end) as the command's stdin, stdout, stderr and controlling
    /// terminal, for `builder debug shell`; `None`: stdin is /dev/null and the output is
    /// captured line by line. Only the builtin executor takes one.
    pub terminal: Option<std::os::fd::RawFd>,
    /// `--ulimit`s (the process's rlimits) and `--shm-size` (/dev/shm's size).
    pub limits: crate::plan::RunLimits,
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

pub(crate) fn serr<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> SandboxError + '_ {
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

/// Whether a step can have its own PID namespace with a fresh /proc here: `Ok(true)`;
/// `Ok(false)` where namespaces can be made but the kernel refuses a new proc mount (a
/// container whose /proc has masked paths); `Err` where no namespace can be made at all.
/// `scratch` is an empty directory to mount on.
pub fn probe_process_sandbox(scratch: &Path) -> Result<bool, String> {
    use nix::sched::{unshare, CloneFlags};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    let target = scratch.join("proc-probe");
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {}", target.display(), e))?;
    let exit_with = |code: i32| -> ! { unsafe { libc::_exit(code) } };
    // SAFETY: the children only unshare, mount and exit.
    match unsafe { fork() }.map_err(|e| format!("fork: {}", e))? {
        ForkResult::Child => {
            if unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID).is_err() {
                exit_with(2);
            }
            let private = nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            );
            if private.is_err() {
                exit_with(2);
            }
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    let ok = nix::mount::mount(
                        Some("proc"),
                        &target,
                        Some("proc"),
                        nix::mount::MsFlags::MS_NOSUID
                            | nix::mount::MsFlags::MS_NODEV
                            | nix::mount::MsFlags::MS_NOEXEC,
                        None::<&str>,
                    )
                    .is_ok();
                    exit_with(if ok { 0 } else { 1 })
                }
                Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, c)) => exit_with(c),
                    _ => exit_with(3),
                },
                Err(_) => exit_with(3),
            }
        }
        ForkResult::Parent { child } => {
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            match status {
                Ok(WaitStatus::Exited(_, 0)) => Ok(true),
                Ok(WaitStatus::Exited(_, 1)) => Ok(false),
                Ok(WaitStatus::Exited(_, 2)) => {
                    Err("no mount and PID namespace can be made here".into())
                }
                other => Err(format!("the sandbox probe ended with {:?}", other)),
            }
        }
    }
}

/// Run the step; `on_line` receives its output (stdout and stderr merged) line by line.
pub fn run(spec: &RunSpec, on_line: &mut dyn FnMut(&str)) -> Result<Exit, SandboxError> {
    let net = match spec.network {
        NetworkMode::Private => Some(network::acquire(spec.insecure)?),
        NetworkMode::Loopback | NetworkMode::Host => None,
    };
    let oci = policy::runtime_spec(spec, spec.root.target(), net.as_ref().map(|n| n.path()));
    let result = match &spec.executor {
        Executor::Builtin => builtin::run(&oci, &spec.root, spec.terminal, on_line),
        Executor::Runtime(_) if spec.terminal.is_some() => Err(SandboxError(
            "a terminal is only given by builder's own executor".into(),
        )),
        Executor::Runtime(binary) => runtime::run(binary, &oci, &spec.root, on_line),
    };
    drop(net);
    result
}

/// Read a child's output pipe line by line until it closes.
pub(crate) fn pump_lines(file: std::fs::File, on_line: &mut dyn FnMut(&str)) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                on_line(line.trim_end_matches('\n'));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

/// Signal numbers as names for messages.
pub fn signal_name(s: i32) -> String {
    Signal::try_from(s)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {}", s))
}
