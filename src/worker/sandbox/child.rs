//! The end of a forked helper, shared by the sandbox's helper and the in-place executor: how a
//! child reports and exits without std's locks, and how a subreaper clears what a step left.

use std::fs;

use super::SandboxError;

/// End a forked child: its exit code, or, after a set-up failure, the reason on the error
/// pipe and exit status 1 (which the parent then ignores).
pub(crate) fn exit_child(err_fd: i32, outcome: Result<i32, SandboxError>) -> ! {
    let code = match outcome {
        Ok(c) => c,
        Err(e) => {
            write_fd(err_fd, &format!("{}\n", e));
            1
        }
    };
    unsafe { libc::_exit(code) }
}

/// Write to a file descriptor from a forked child without std's locks.
pub(crate) fn write_fd(fd: i32, msg: &str) {
    unsafe {
        libc::write(fd, msg.as_ptr().cast(), msg.len());
    }
}

/// Kill and reap everything the step left behind (orphans reparent to this subreaper).
pub(crate) fn kill_descendants() {
    let me = std::process::id();
    for _ in 0..10_000 {
        let children =
            fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        let pids: Vec<i32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for _ in &pids {
            let _ = nix::sys::wait::waitpid(None, None);
        }
    }
}

/// In a forked child: stdout and stderr to `fd`, stdin from /dev/null.
pub(crate) fn stdio_to(fd: std::os::fd::RawFd) {
    // SAFETY: plain descriptor calls in a forked child.
    unsafe {
        libc::dup2(fd, 1);
        libc::dup2(fd, 2);
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if devnull >= 0 {
            libc::dup2(devnull, 0);
            if devnull > 2 {
                libc::close(devnull);
            }
        }
    }
}
