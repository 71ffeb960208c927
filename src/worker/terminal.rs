//! A pseudo-terminal for an interactive step (`builder debug shell`). The command gets a new
//! pty of its own, never builder's terminal: a process that held the user's terminal could
//! push input into it after it exits (TIOCSTI). Builder relays its stdin to the pty and the
//! pty's output to its stdout, with its own terminal, if stdin is one, in raw mode meanwhile.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::termios;

/// Run `f` with the terminal end of a new pty (for [`super::RunSpec::terminal`]) while
/// relaying; returns what `f` returns once the command's output is all written.
pub fn with_pty<R>(f: impl FnOnce(RawFd) -> R) -> Result<R, String> {
    let stdin = std::io::stdin();
    let stdin_tty = nix::unistd::isatty(stdin.as_raw_fd()).unwrap_or(false);
    let size = stdin_tty.then(|| window_size(stdin.as_raw_fd())).flatten();
    let pty = nix::pty::openpty(size.as_ref(), None).map_err(|e| format!("openpty: {}", e))?;
    for fd in [&pty.master, &pty.slave] {
        cloexec(fd)?;
    }
    let raw = stdin_tty
        .then(|| RawMode::enter(stdin.as_raw_fd()))
        .flatten();
    let master_in = pty.master.try_clone().map_err(|e| e.to_string())?;
    // Input: whatever comes, until stdin ends, which ends the command's input as ^D would.
    // The thread is left blocked on stdin when the command ends first.
    std::thread::spawn(move || {
        let mut master = std::fs::File::from(master_in);
        let mut buf = [0u8; 4096];
        loop {
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = master.write_all(&[4]);
                    break;
                }
                Ok(n) => {
                    if master.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    // Output: until every copy of the terminal end is closed (the command and all it
    // started are gone, and builder's own copy is dropped below).
    let master_out = pty.master.try_clone().map_err(|e| e.to_string())?;
    let output = std::thread::spawn(move || {
        let mut master = std::fs::File::from(master_out);
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let result = f(pty.slave.as_raw_fd());
    drop(pty.slave);
    let _ = output.join();
    drop(raw);
    Ok(result)
}

fn cloexec(fd: &OwnedFd) -> Result<(), String> {
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map(|_| ())
    .map_err(|e| format!("fcntl: {}", e))
}

/// The size of the terminal on `fd`, when it is one that knows it.
pub fn window_size(fd: RawFd) -> Option<nix::pty::Winsize> {
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(ws)
}

/// The user's terminal in raw mode, restored when dropped.
struct RawMode {
    fd: RawFd,
    saved: termios::Termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> Option<RawMode> {
        // SAFETY: stdin stays open for the life of the process.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let saved = termios::tcgetattr(borrowed).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(borrowed, termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(borrowed, termios::SetArg::TCSANOW, &self.saved);
    }
}
