//! `RUN --mount=type=ssh`: the agent `--ssh` names is reached through a socket of the
//! step's own, owned and moded as the mount says, whose connections are relayed to the
//! agent. The step never learns the agent's host path, no key ever reaches it, and the
//! socket lives outside the store and the step's layer.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A relay from a socket of the step's to an ssh agent; stopped when dropped.
pub struct SshRelay {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<()>>,
    /// The private directory the socket is in (removed with the relay).
    _dir: tempfile::TempDir,
}

impl SshRelay {
    /// Listen on a new socket (mode and owner as given) that relays to `agent`.
    pub fn start(agent: &Path, mode: u32, uid: u32, gid: u32) -> Result<SshRelay, String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let socket = dir.path().join("agent.sock");
        let listener =
            UnixListener::bind(&socket).map_err(|e| format!("{}: {}", socket.display(), e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {}", socket.display(), e))?;
        nix::unistd::chown(&socket, Some(uid.into()), Some(gid.into()))
            .map_err(|e| format!("{}: {}", socket.display(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let agent = agent.to_path_buf();
        let accepting = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let agent = agent.clone();
                std::thread::spawn(move || {
                    let _ = relay(conn, &agent);
                });
            }
        });
        Ok(SshRelay {
            socket,
            stop,
            accepting: Some(accepting),
            _dir: dir,
        })
    }

    /// The socket the step's mount binds.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for SshRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread, which then sees the stop.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
    }
}

/// Copy both ways between a step's connection and the agent until either side closes.
fn relay(step: UnixStream, agent: &Path) -> io::Result<()> {
    let upstream = UnixStream::connect(agent)?;
    let (mut step_r, mut up_w) = (step.try_clone()?, upstream.try_clone()?);
    let to_agent = std::thread::spawn(move || {
        let _ = io::copy(&mut step_r, &mut up_w);
        let _ = up_w.shutdown(std::net::Shutdown::Write);
    });
    let (mut up_r, mut step_w) = (upstream, step);
    let _ = io::copy(&mut up_r, &mut step_w);
    let _ = step_w.shutdown(std::net::Shutdown::Write);
    let _ = to_agent.join();
    Ok(())
}

/// An `ssh-agent` of the build's own holding the keys `--ssh ID=KEY` names (the system's
/// agent: builder reads no key itself); stopped when dropped.
pub struct KeyAgent {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl KeyAgent {
    pub fn start(keys: &[PathBuf]) -> Result<KeyAgent, String> {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("ssh-agent: {} (install openssh-client)", e))?;
        let agent = KeyAgent {
            child,
            socket,
            _dir: dir,
        };
        let started = std::time::Instant::now();
        while !agent.socket.exists() {
            if started.elapsed() > std::time::Duration::from_secs(10) {
                return Err("ssh-agent did not start within 10 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for key in keys {
            let out = Command::new("ssh-add")
                .arg("-q")
                .arg(key)
                .env("SSH_AUTH_SOCK", &agent.socket)
                .env_remove("SSH_ASKPASS")
                .env_remove("DISPLAY")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("ssh-add: {} (install openssh-client)", e))?;
            if !out.status.success() {
                return Err(format!(
                    "{}: not a key ssh-add can load without a passphrase: {}",
                    key.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(agent)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for KeyAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
