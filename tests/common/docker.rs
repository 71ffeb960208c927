//! A dockerd for tests, off the host's network: the one `.ci/run` started
//! (`BUILDER_PARITY_DOCKER_HOST`), else one of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Docker {
    pub host: String,
    daemon: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.daemon {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

pub fn docker_client() -> PathBuf {
    let client = PathBuf::from("/usr/bin/docker");
    assert!(
        client.is_file(),
        "docker is not installed: apt-get install docker.io (or run .ci/run)"
    );
    client
}

impl Docker {
    pub fn start() -> Docker {
        docker_client();
        if let Ok(host) = std::env::var("BUILDER_PARITY_DOCKER_HOST") {
            return Docker {
                host,
                daemon: None,
                _dir: None,
            };
        }
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("dockerd is not installed: apt-get install docker.io (or run .ci/run)");
        // Short paths: the socket's path must fit in sun_path.
        let dir = tempfile::Builder::new()
            .prefix("dk")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().to_path_buf();
        let sock = d.join("sock");
        let log = std::fs::File::create(d.join("log")).unwrap();
        let child = Command::new(dockerd)
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let docker = Docker {
            host: format!("unix://{}", sock.display()),
            daemon: Some(child),
            _dir: Some(dir),
        };
        let start = Instant::now();
        while !docker
            .cmd()
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not start: see {}",
                d.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        docker
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(docker_client());
        c.env("DOCKER_HOST", &self.host).env("DOCKER_BUILDKIT", "1");
        c
    }
}
