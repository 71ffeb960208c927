//! Networks for RUN steps.
//!
//! `--network=default` gives a step a network namespace of its own whose only way out is
//! slirp4netns, the user-mode network stack rootless podman and BuildKit use, started with
//! `--disable-host-loopback` so the step cannot reach services on the host's loopback. The
//! namespace is held open by a small child process for as long as the step runs; the stack
//! and the holder end with the step (or with builder).
//!
//! pasta is not used: with the version Debian 12 ships, a step's connection to a host on a
//! second interface of the machine never arrived in our tests (pasta copies the address and
//! routes of the default interface into the namespace), so it could not be verified here.
//!
//! A missing helper is an error that says what to install, never a silent fallback to the
//! host's network.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use super::{serr, SandboxError};

/// The address of slirp4netns's DNS forwarder inside the namespace.
pub const SLIRP_DNS: &str = "10.0.2.3";

/// Bring `lo` up in the calling process's network namespace.
pub fn loopback_up() {
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

/// slirp4netns on PATH.
pub fn find_slirp4netns() -> Result<PathBuf, SandboxError> {
    which("slirp4netns").ok_or_else(|| {
        SandboxError(
            "RUN with --network=default needs slirp4netns, the user-mode network stack that \
             keeps the step off the host's network (apt-get install slirp4netns), or build \
             with --network=none"
                .into(),
        )
    })
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A private network namespace with a user-mode stack attached.
pub struct PrivateNetwork {
    holder: Pid,
    /// Closing it ends the holder.
    hold: Option<OwnedFd>,
    helper: Option<Child>,
    /// Closing it ends slirp4netns (`--exit-fd`).
    exit: Option<OwnedFd>,
    path: PathBuf,
    /// Whether a finished step may give it back for reuse.
    poolable: bool,
}

impl PrivateNetwork {
    /// Whether its holder and its stack still run.
    fn alive(&mut self) -> bool {
        let helper_running = self
            .helper
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        // A holder that died but is not reaped yet still "exists"; its namespace does not.
        helper_running
            && crate::oci::blobs::process_exists(self.holder.as_raw())
            && std::fs::metadata(&self.path).is_ok()
    }

    /// Create the namespace and attach the stack; returns once the stack is ready.
    pub fn start() -> Result<PrivateNetwork, SandboxError> {
        let binary = find_slirp4netns()?;
        let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
        let (hold_r, hold_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
        // SAFETY: the child only unshares, writes a byte and blocks on a read.
        let holder = match unsafe { fork() }.map_err(serr("fork"))? {
            ForkResult::Child => {
                drop(ready_r);
                drop(hold_w);
                // The holder never execs, so it would keep every descriptor the other
                // threads had open at the fork: among them the pipe through which a
                // concurrent `Command::spawn` learns that its child exec'd, whose spawn would
                // then wait for as long as the holder lives. It keeps only its two pipes.
                close_all_but(&[ready_w.as_raw_fd(), hold_r.as_raw_fd()]);
                // No PR_SET_PDEATHSIG: it fires when the forking *thread* ends, and stages
                // run on threads that end while their namespaces sit in the pool. The hold
                // pipe ends the holder when builder exits, however it exits.
                let ok = unshare(CloneFlags::CLONE_NEWNET).is_ok();
                if ok {
                    loopback_up();
                    let _ = nix::unistd::write(&ready_w, b"1");
                }
                drop(ready_w);
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(hold_r.as_raw_fd(), &mut b);
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => child,
        };
        drop(ready_w);
        drop(hold_r);
        let mut net = PrivateNetwork {
            holder,
            hold: Some(hold_w),
            helper: None,
            exit: None,
            path: PathBuf::from(format!("/proc/{}/ns/net", holder)),
            poolable: true,
        };
        let mut b = [0u8; 1];
        if !matches!(std::fs::File::from(ready_r).read(&mut b), Ok(1)) {
            return Err(SandboxError("could not create a network namespace".into()));
        }
        net.attach_slirp4netns(&binary)?;
        Ok(net)
    }

    /// The namespace, as a path a runtime can join.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn attach_slirp4netns(&mut self, binary: &Path) -> Result<(), SandboxError> {
        let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
        let (exit_r, exit_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(serr("pipe"))?;
        let (ready_fd, exit_fd) = (ready_w.as_raw_fd(), exit_r.as_raw_fd());
        let mut cmd = Command::new(binary);
        cmd.args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--ready-fd=3",
            "--exit-fd=4",
        ]);
        if !crate::worker::rootless() {
            cmd.args(["--enable-sandbox", "--enable-seccomp"]);
        }
        cmd.arg(self.holder.to_string())
            .arg("tap0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only dup2 between fork and exec. No PR_SET_PDEATHSIG (it follows the
        // forking thread, see the holder): slirp4netns exits when --exit-fd closes, which
        // happens when builder exits, however it exits.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(ready_fd, 3) < 0 || libc::dup2(exit_fd, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError(format!("start {}: {}", binary.display(), e)))?;
        drop(ready_w);
        drop(exit_r);
        self.exit = Some(exit_w);
        let mut b = [0u8; 1];
        let ready = matches!(std::fs::File::from(ready_r).read(&mut b), Ok(1));
        if !ready {
            let mut msg = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut msg);
            }
            let _ = child.kill();
            let _ = child.wait();
            let hint = if msg.contains("/dev/net/tun") && crate::worker::rootless() {
                " (rootless --network=default needs /dev/net/tun to be readable and writable by \
                 you, as Debian's default mode 0666 makes it; or build with --network=none)"
            } else {
                ""
            };
            return Err(SandboxError(format!(
                "{} did not start: {}{}",
                binary.display(),
                msg.trim(),
                hint
            )));
        }
        self.helper = Some(child);
        Ok(())
    }
}

/// Namespaces a finished step gave back, for the next step of this build process: starting
/// slirp4netns costs tens of milliseconds, so, as BuildKit pools its network namespaces, one
/// is reused once its step is over. Nothing of a step outlives it there: its processes died
/// with its PID namespace, its sockets with them, and without CAP_NET_ADMIN (and with
/// /proc/sys read-only) it could change neither addresses, routes, firewall nor sysctls.
static POOL: std::sync::Mutex<Vec<PrivateNetwork>> = std::sync::Mutex::new(Vec::new());

/// A private network held by one step; given back to the pool when dropped.
pub struct Leased(Option<PrivateNetwork>);

impl Leased {
    pub fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |n| n.path())
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Some(n) = self.0.take().filter(|n| n.poolable) {
            if let Ok(mut pool) = POOL.lock() {
                pool.push(n);
            }
        }
    }
}

/// A private network for a step: a pooled one whose stack is still alive, or a new one. An
/// insecure step holds CAP_NET_ADMIN and could change its namespace, so it gets a fresh one
/// that is never pooled.
pub fn acquire(insecure: bool) -> Result<Leased, SandboxError> {
    if !insecure {
        while let Some(mut n) = POOL.lock().ok().and_then(|mut p| p.pop()) {
            if n.alive() {
                return Ok(Leased(Some(n)));
            }
        }
    }
    let mut fresh = PrivateNetwork::start()?;
    fresh.poolable = !insecure;
    Ok(Leased(Some(fresh)))
}

impl Drop for PrivateNetwork {
    fn drop(&mut self) {
        self.exit.take();
        if let Some(mut c) = self.helper.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.hold.take();
        let _ = nix::sys::signal::kill(self.holder, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(self.holder, None);
    }
}

/// The resolv.conf a step with a private network gets: the host's, without loopback
/// nameservers (unreachable from the namespace), and slirp4netns's forwarder when none is
/// left, as docker drops loopback resolvers for its bridge network.
pub fn private_resolv_conf(host: &str) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let addr = words.next().unwrap_or("");
            if addr.starts_with("127.") || addr == "::1" {
                continue;
            }
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if servers == 0 {
        out.push_str(&format!("nameserver {}\n", SLIRP_DNS));
    }
    out
}

/// Close every descriptor from 3 up except `keep`, in a child after fork (async-signal-safe:
/// only close_range(2) and close(2)).
fn close_all_but(keep: &[i32]) {
    let mut keep: Vec<i32> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for &fd in keep.iter().chain(std::iter::once(&i32::MAX)) {
        let to = (fd as u32).saturating_sub(1);
        if from <= to {
            // SAFETY: closes descriptors of this process only; nothing here uses them.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0) };
            if r != 0 {
                for f in from..=to.min(65_535) {
                    unsafe { libc::close(f as i32) };
                }
            }
        }
        from = (fd as u32).saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_nameservers_are_replaced() {
        let r = private_resolv_conf("search lan\nnameserver 127.0.0.53\n");
        assert_eq!(r, "search lan\nnameserver 10.0.2.3\n");
        let r = private_resolv_conf("nameserver 192.0.2.1\nnameserver ::1\n");
        assert_eq!(r, "nameserver 192.0.2.1\n");
    }
}
