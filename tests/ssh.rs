//! `RUN --mount=type=ssh` with `--ssh`: a step reaches the agent through a socket of its
//! own (owner and mode as the mount says), which is not in its layer or its key; a required
//! mount without an agent is a clear error; `--ssh ID=KEY` loads keys into an ssh-agent of
//! the build's own. The agents are real `ssh-agent`s, asked by a static probe in the step.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A running `ssh-agent` holding `keys` fresh ed25519 keys; killed when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key(dir: &Path, name: &str) -> PathBuf {
    let k = dir.join(name);
    run_ok(
        tool("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&k),
    );
    k
}

fn agent(dir: &Path, name: &str, keys: usize) -> Agent {
    let socket = dir.join(format!("{name}.sock"));
    let child = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-agent is not installed: run .ci/run (openssh-client)");
    let a = Agent { child, socket };
    for _ in 0..500 {
        if a.socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for i in 0..keys {
        let k = key(dir, &format!("{name}-key{i}"));
        run_ok(
            tool("ssh-add")
                .arg("-q")
                .arg(&k)
                .env("SSH_AUTH_SOCK", &a.socket),
        );
    }
    a
}

/// A context with the agent probe, whose build file copies it into busybox and then runs
/// `steps`; and the store beside it.
fn context(dir: &Path, steps: &str) -> (PathBuf, PathBuf) {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ssh/agent_ids.c");
    run_ok(
        tool("cc")
            .args(["-static", "-O1", "-o"])
            .arg(ctx.join("agent_ids"))
            .arg(&src),
    );
    write(
        &ctx.join("Buildfile"),
        &format!("FROM busybox:test\nCOPY agent_ids /bin/agent_ids\n{steps}"),
    );
    (dir.join("root"), ctx)
}

#[test]
fn a_step_reaches_the_agent_through_its_own_socket_which_stays_out_of_layer_and_key() {
    let d = busybox_dir();
    let (root, ctx) = context(
        d.path(),
        "RUN --mount=type=ssh agent_ids > /ids && stat -c '%u %a' \"$SSH_AUTH_SOCK\" > /sock\n\
         RUN --mount=type=ssh,id=deploy,uid=1000,mode=0640,target=/tmp/deploy.sock \
         stat -c '%u %a' /tmp/deploy.sock > /deploy && agent_ids /tmp/deploy.sock >> /deploy\n",
    );
    let one = agent(d.path(), "one", 1);
    let two = agent(d.path(), "two", 2);
    let layout = d.path().join("layout");
    let first = run_ok(
        build_cmd(&root)
            .args(["--ssh", &format!("default={}", one.socket.display())])
            .args(["--ssh", &format!("deploy={}", two.socket.display())])
            .args(["-o", &format!("oci:{}:t", layout.display())])
            .arg(&ctx),
    );
    let fs = umoci_unpack(&layout, "t", d.path()).join("rootfs");
    let read = |f: &str| std::fs::read_to_string(fs.join(f)).unwrap();
    assert_eq!(read("ids"), "identities=1\n");
    assert_eq!(read("sock"), "0 600\n", "BuildKit's default owner and mode");
    assert_eq!(read("deploy"), "1000 640\nidentities=2\n");
    // Neither the socket nor the directories made for it are in the image.
    assert!(
        !fs.join("run").exists(),
        "the mount point stayed in the layer"
    );
    assert!(!fs.join("tmp/deploy.sock").exists());

    // Another agent at another path: the same steps, from the cache.
    let three = agent(d.path(), "three", 3);
    let again = run_ok(
        build_cmd(&root)
            .args(["--ssh", &format!("default={}", three.socket.display())])
            .args(["--ssh", &format!("deploy={}", three.socket.display())])
            .arg(&ctx),
    );
    assert_eq!(first.lines().last(), again.lines().last(), "{again}");
}

#[test]
fn a_required_mount_needs_an_agent_and_keys_get_an_agent_of_their_own() {
    let d = busybox_dir();
    let (root, ctx) = context(
        d.path(),
        "RUN --mount=type=ssh,required=true agent_ids > /ids\n",
    );
    let out = run(build_cmd(&root).env_remove("SSH_AUTH_SOCK").arg(&ctx));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ssh") && err.contains("--ssh default"),
        "{err}"
    );

    // A key file: builder loads it into an ssh-agent of its own for the build.
    let k = key(d.path(), "deploy");
    let local = d.path().join("out");
    run_ok(
        build_cmd(&root)
            .args(["--ssh", &format!("default={}", k.display())])
            .args(["-o", &format!("local:{}", local.display())])
            .arg(&ctx),
    );
    assert_eq!(
        std::fs::read_to_string(local.join("ids")).unwrap(),
        "identities=1\n"
    );

    // Not required and not given: the step runs without the socket.
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nRUN --mount=type=ssh ls /run/buildkit > /listed 2>&1 || echo \"abs$(echo ent)\" > /listed\n",
    );
    run_ok(
        build_cmd(&root)
            .env_remove("SSH_AUTH_SOCK")
            .args(["-o", &format!("local:{}", local.display())])
            .arg(&ctx),
    );
    assert_eq!(
        std::fs::read_to_string(local.join("listed")).unwrap(),
        "absent\n"
    );

    // A bad --ssh value names itself.
    for (value, says) in [("x=/does/not/exist", "/does/not/exist"), ("=y", "--ssh")] {
        let bad = run(build_cmd(&root).args(["--ssh", value]).arg(&ctx));
        assert!(!bad.status.success());
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(says), "{value}: {err}");
    }
}
