//! An exec op's run-time parts: the step's user (from the image's passwd file), its mounts
//! (`RUN --mount`: cache directories, binds, tmpfs, secrets, with the `--secret` sources the
//! command line parsed), the spec it runs with, and the tail of its output an error shows.
//! The argv and environment come resolved in the op.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fs2::FileExt;

use crate::context::SourceRoot;
use crate::plan::{Input, MountKind, RunMount, Sharing};
use crate::worker::ExtraMount;

use super::users;

/// Environment variables in order.
pub type EnvList = Vec<(String, String)>;

pub use crate::oci::image::DEFAULT_PATH;

/// Where a `--secret id=...` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// Resources a step's mounts hold until it finishes (locks, private copies).
#[derive(Default)]
pub struct MountGuards {
    pub locks: Vec<fs::File>,
    pub dirs: Vec<tempfile::TempDir>,
    pub pins: Vec<PinnedBind>,
    pub relays: Vec<super::ssh::SshRelay>,
}

/// A context entry a step binds, pinned: opened below the context with no symlink followed,
/// then bound by that descriptor onto a mount point of builder's own (its private mount
/// namespace), which the step's mount then names. A path swapped for a link to the host
/// between the walk and the step is refused, or else it is already too late to matter.
pub struct PinnedBind {
    point: PathBuf,
    /// `None` once it could not be unmounted: then it is left in place, never deleted
    /// (deleting through a bind would delete the context's files).
    dir: Option<tempfile::TempDir>,
}

impl PinnedBind {
    fn new(source: &Path, scratch: &Path) -> Result<PinnedBind, String> {
        use nix::fcntl::OFlag;
        let refused = |e: std::io::Error| format!("{}: {}", source.display(), e);
        let fd = crate::oci::at::open_nofollow(source, OFlag::O_PATH).map_err(refused)?;
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(|e| refused(e.into()))?;
        let holder = tempfile::tempdir_in(scratch).map_err(|e| e.to_string())?;
        let point = holder.path().join("pin");
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => fs::create_dir(&point).map_err(|e| e.to_string())?,
            libc::S_IFREG => drop(fs::File::create(&point).map_err(|e| e.to_string())?),
            libc::S_IFLNK => {
                return Err(format!(
                    "{}: a symlink is on this path, where the build's walk found none (the build context changed during the build)",
                    source.display()
                ))
            }
            _ => return Err(format!("bind source {} is not a regular file or directory", source.display())),
        }
        let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        nix::mount::mount(
            Some(by_fd.as_str()),
            &point,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("pin {} for its bind mount: {}", source.display(), e))?;
        Ok(PinnedBind {
            point,
            dir: Some(holder),
        })
    }
}

impl Drop for PinnedBind {
    fn drop(&mut self) {
        if nix::mount::umount2(&self.point, nix::mount::MntFlags::MNT_DETACH).is_err() {
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

/// Inputs for resolving `RUN --mount` specs.
pub struct MountEnv<'a> {
    /// Where `type=cache` mounts live (the store's bucket).
    pub cache_mounts: &'a Path,
    pub scratch: &'a Path,
    pub context: &'a SourceRoot,
    /// `--build-context NAME=DIR`s, by name.
    pub named: &'a BTreeMap<String, SourceRoot>,
    pub secrets: &'a BTreeMap<String, SecretSource>,
    /// `--ssh`: each id's agent socket.
    pub ssh: &'a BTreeMap<String, PathBuf>,
    /// Finds the root filesystem of a stage or image named by `from=`.
    pub from_root: &'a mut dyn FnMut(&Input) -> Result<PathBuf, String>,
    /// No mount can be made (`--isolation container`): context sources are copied, read
    /// from the context without following links, instead of pinned by a bind.
    pub copy_context: bool,
}

/// The name of a `type=cache` mount's directory in the store's bucket. BuildKit seeds a
/// cache that names an owner or mode from its own base directory, so (id, uid, gid, mode)
/// is what one cache is; the id defaults to the target.
pub fn cache_mount_key(m: &RunMount) -> String {
    let target = m.target.clone().unwrap_or_else(|| "/".into());
    let id = m.id.clone().unwrap_or(target);
    let identity = match (m.uid, m.gid, m.mode) {
        (None, None, None) => id,
        (u, g, md) => format!("{}\0{:?}\0{:?}\0{:?}", id, u, g, md),
    };
    crate::oci::digest::Digest::of(identity.as_bytes()).hex()[..32].to_string()
}

/// Give a new cache mount's directory the mode and owner its mount names (0755, root).
pub fn own_cache_dir(dir: &Path, m: &RunMount) -> Result<(), String> {
    fs::set_permissions(dir, fs::Permissions::from_mode(m.mode.unwrap_or(0o755)))
        .map_err(|e| format!("{}: {}", dir.display(), e))?;
    let _ = nix::unistd::chown(
        dir,
        Some(m.uid.unwrap_or(0).into()),
        Some(m.gid.unwrap_or(0).into()),
    );
    Ok(())
}

/// Turn parsed mounts into sandbox mounts plus extra environment (secret `env=`).
pub fn resolve_mounts(
    mounts: &[RunMount],
    me: &mut MountEnv,
    guards: &mut MountGuards,
) -> Result<(Vec<ExtraMount>, EnvList), String> {
    let mut out = Vec::new();
    let mut env = Vec::new();
    for m in mounts {
        match m.kind {
            MountKind::Ssh => {
                let id = m.id.clone().unwrap_or_else(|| "default".into());
                let Some(agent) = me.ssh.get(&id) else {
                    if m.required {
                        return Err(format!(
                            "ssh mount {} is required but no agent was given (--ssh {}[=SOCKET])",
                            id, id
                        ));
                    }
                    continue;
                };
                let target = m
                    .target
                    .clone()
                    .unwrap_or_else(|| "/run/buildkit/ssh_agent.0".into());
                let relay = super::ssh::SshRelay::start(
                    agent,
                    m.mode.unwrap_or(0o600),
                    m.uid.unwrap_or(0),
                    m.gid.unwrap_or(0),
                )
                .map_err(|e| format!("ssh mount {}: {}", id, e))?;
                // As BuildKit: the first ssh mount is the step's agent.
                if !env
                    .iter()
                    .any(|(k, _): &(String, String)| k == "SSH_AUTH_SOCK")
                {
                    env.push(("SSH_AUTH_SOCK".into(), target.clone()));
                }
                out.push(ExtraMount::Bind {
                    source: relay.socket().to_path_buf(),
                    target,
                    readonly: false,
                });
                guards.relays.push(relay);
            }
            MountKind::Tmpfs => out.push(ExtraMount::Tmpfs {
                target: m.target.clone().unwrap_or_else(|| "/tmp".into()),
                size: m.size,
            }),
            MountKind::Cache => {
                let target = m.target.clone().unwrap_or_else(|| "/".into());
                let key = cache_mount_key(m);
                let dir = me.cache_mounts.join(&key);
                if !dir.exists() {
                    fs::create_dir_all(&dir).map_err(|e| format!("{}: {}", dir.display(), e))?;
                    own_cache_dir(&dir, m)?;
                }
                if m.sharing != Sharing::Shared {
                    let lock_path = me.cache_mounts.join(format!("{}.lock", key));
                    let f = fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&lock_path)
                        .map_err(|e| e.to_string())?;
                    f.lock_exclusive().map_err(|e| e.to_string())?;
                    guards.locks.push(f);
                }
                out.push(ExtraMount::Bind {
                    source: dir,
                    target,
                    readonly: m.readonly,
                });
            }
            MountKind::Bind => {
                let target = m.target.clone().unwrap_or_else(|| "/".into());
                let src_rel = m.source.clone().unwrap_or_else(|| "/".into());
                let source = match &m.from {
                    f @ (Input::Stage(_) | Input::Image(_)) => {
                        let root = (me.from_root)(f)?;
                        crate::oci::unpack::resolve_in_root(
                            &root,
                            Path::new(src_rel.trim_start_matches('/')),
                        )
                        .map_err(|e| e.to_string())?
                    }
                    from @ (Input::Context | Input::Local(_)) => {
                        let context = match from {
                            Input::Local(name) => me
                                .named
                                .get(name)
                                .ok_or_else(|| format!("no build context named {:?}", name))?,
                            _ => me.context,
                        };
                        let found = context.expand(&src_rel).map_err(|e| e.to_string())?;
                        let first = found.into_iter().next().ok_or_else(|| {
                            format!("{}: not found in the build context", src_rel)
                        })?;
                        if me.copy_context && !first.path.is_dir() {
                            let copy =
                                tempfile::tempdir_in(me.scratch).map_err(|e| e.to_string())?;
                            let p = copy.path().join("data");
                            let mut from = crate::oci::at::open_regular(&first.path)
                                .map_err(|e| format!("{}: {}", first.path.display(), e))?;
                            let mut to = fs::File::create(&p).map_err(|e| e.to_string())?;
                            std::io::copy(&mut from, &mut to).map_err(|e| e.to_string())?;
                            let mode = from.metadata().map_err(|e| e.to_string())?.permissions();
                            fs::set_permissions(&p, mode).map_err(|e| e.to_string())?;
                            guards.dirs.push(copy);
                            p
                        } else if (me.copy_context || !context.ignore.is_empty())
                            && first.path.is_dir()
                        {
                            // Ignored files must stay invisible: bind a filtered copy.
                            let copy =
                                tempfile::tempdir_in(me.scratch).map_err(|e| e.to_string())?;
                            copy_filtered(context, &first.rel, &first.path, copy.path())?;
                            let p = copy.path().to_path_buf();
                            guards.dirs.push(copy);
                            p
                        } else {
                            let pin = PinnedBind::new(&first.path, me.scratch)?;
                            let p = pin.point.clone();
                            guards.pins.push(pin);
                            p
                        }
                    }
                };
                check_bind_source(&src_rel, &source)?;
                let source = if !m.readonly {
                    // Writes to a rw bind are discarded: give the step a private copy.
                    let copy = tempfile::tempdir_in(me.scratch).map_err(|e| e.to_string())?;
                    let dst = copy.path().join("data");
                    if source.is_dir() {
                        crate::worker::copy_tree(&source, &dst).map_err(|e| e.to_string())?;
                    } else {
                        fs::copy(&source, &dst).map_err(|e| e.to_string())?;
                    }
                    guards.dirs.push(copy);
                    dst
                } else {
                    source
                };
                out.push(ExtraMount::Bind {
                    source,
                    target,
                    readonly: m.readonly,
                });
            }
            MountKind::Secret => {
                let id = m.id.clone().unwrap_or_default();
                let value = match me.secrets.get(&id) {
                    Some(SecretSource::File(p)) => Some(
                        fs::read(p)
                            .map_err(|e| format!("secret {}: {}: {}", id, p.display(), e))?,
                    ),
                    Some(SecretSource::Env(v)) => {
                        std::env::var_os(v).map(|v| v.into_encoded_bytes())
                    }
                    None => None,
                };
                let Some(value) = value else {
                    if m.required {
                        return Err(format!(
                            "secret {} is required but was not provided (--secret id={},src=FILE)",
                            id, id
                        ));
                    }
                    continue;
                };
                if let Some(var) = &m.env {
                    env.push((var.clone(), String::from_utf8_lossy(&value).into_owned()));
                }
                let Some(target) = m.target.clone() else {
                    continue;
                };
                // Secrets live outside the store, in a private directory removed after the step.
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let file = dir.path().join("secret");
                fs::write(&file, &value).map_err(|e| e.to_string())?;
                fs::set_permissions(&file, fs::Permissions::from_mode(m.mode.unwrap_or(0o400)))
                    .map_err(|e| e.to_string())?;
                let _ = nix::unistd::chown(
                    &file,
                    Some(m.uid.unwrap_or(0).into()),
                    Some(m.gid.unwrap_or(0).into()),
                );
                guards.dirs.push(dir);
                out.push(ExtraMount::Bind {
                    source: file,
                    target,
                    readonly: true,
                });
            }
        }
    }
    Ok((out, env))
}

/// A bind source must be a directory or a regular file: a FIFO, socket or device would
/// block the copy (or hand the step a host device), so it is refused by name.
fn check_bind_source(name: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let ft = fs::metadata(path)
        .map_err(|e| format!("bind source {}: {}", name, e))?
        .file_type();
    let kind = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        return Ok(());
    };
    Err(format!(
        "bind source {} is {}: only directories and regular files can be mounted",
        name, kind
    ))
}

fn copy_filtered(ctx: &SourceRoot, rel: &str, from: &Path, to: &Path) -> Result<(), String> {
    for e in walkdir::WalkDir::new(from).min_depth(1).follow_links(false) {
        let e = e.map_err(|e| e.to_string())?;
        let sub = e.path().strip_prefix(from).unwrap_or(e.path());
        let full = if rel == "." {
            sub.display().to_string()
        } else {
            format!("{}/{}", rel, sub.display())
        };
        if ctx.excluded(&full) {
            continue;
        }
        let dst = to.join(sub);
        let ft = e.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dst).map_err(|e| e.to_string())?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path()).map_err(|e| e.to_string())?, &dst)
                .map_err(|e| e.to_string())?;
        } else if ft.is_file() {
            if let Some(p) = dst.parent() {
                fs::create_dir_all(p).map_err(|e| e.to_string())?;
            }
            fs::copy(e.path(), &dst).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The last lines of a step's output, for the failure message.
pub struct Tail {
    lines: VecDeque<String>,
    max: usize,
}

impl Tail {
    pub fn new(max: usize) -> Self {
        Tail {
            lines: VecDeque::new(),
            max,
        }
    }
    pub fn push(&mut self, l: &str) {
        if self.lines.len() == self.max {
            self.lines.pop_front();
        }
        self.lines
            .push_back(crate::text::abbreviate(l, 300).into_owned());
    }
    pub fn render(&self) -> String {
        self.lines.iter().map(|l| format!("\n  > {}", l)).collect()
    }
}

/// Check a supplied user exists when it is a name; used for USER errors before running.
pub fn resolve_step_user(
    rootfs: &Path,
    user: Option<&str>,
) -> Result<(u32, u32, Vec<u32>, Option<String>), String> {
    let db = users::UserDb::load(rootfs)?;
    match user.filter(|u| !u.is_empty()) {
        None => Ok((0, 0, Vec::new(), db.home_of(0))),
        Some(u) => {
            let o = db.user_spec(u)?;
            // As docker: the groups of /etc/group that list the user (by name, a numeric
            // USER too), none when USER names its group; the primary group is not repeated.
            let groups = match db.name_of(o.uid) {
                Some(name) if !u.contains(':') => db.supplementary_groups(&name),
                _ => Vec::new(),
            };
            Ok((o.uid, o.gid, groups, db.home_of(o.uid)))
        }
    }
}

/// The sandbox's network for a step's `--network`.
pub fn network_mode(network: crate::plan::Network) -> crate::worker::sandbox::NetworkMode {
    use crate::plan::Network;
    use crate::worker::sandbox::NetworkMode;
    match network {
        Network::Sandbox => NetworkMode::Private,
        Network::None => NetworkMode::Loopback,
        Network::Host => NetworkMode::Host,
    }
}

/// What a RUN step's spec is made of besides its op: where it runs and what its mounts read.
/// A build's step and `builder debug shell` over a failed one make theirs alike.
pub struct StepSetting<'a> {
    /// The root filesystem the step sees (its passwd and group files name the user).
    pub rootfs: &'a Path,
    /// The step's scratch directory: its /etc files, heredoc script, secrets.
    pub scratch: &'a Path,
    pub network: crate::worker::sandbox::NetworkMode,
    pub insecure: bool,
    pub process_sandbox: bool,
    pub executor: crate::worker::sandbox::Executor,
    pub mounts: MountEnv<'a>,
}

/// The spec `e` runs with in `setting`: its user resolved in the root filesystem, HOME,
/// the /etc files provided for it (never captured), its mounts and their environment, and a
/// heredoc script. What the mounts hold stays in `guards` until the step is done.
pub fn step_spec(
    e: &crate::plan::ExecOp,
    setting: StepSetting,
    guards: &mut MountGuards,
) -> Result<crate::worker::RunSpec, String> {
    use crate::worker::sandbox::{NetworkMode, RootMount};
    let StepSetting {
        rootfs,
        scratch,
        network,
        insecure,
        process_sandbox,
        executor,
        mounts: mut mount_env,
    } = setting;
    let (uid, gid, groups, home) = resolve_step_user(rootfs, e.user.as_deref())?;
    let mut env = e.env.clone();
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), home.unwrap_or_else(|| "/root".into())));
    }
    let etc = scratch.join("etc");
    fs::create_dir_all(&etc).map_err(|e| format!("{}: {}", etc.display(), e))?;
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv = match network {
        NetworkMode::Private => crate::worker::sandbox::network::private_resolv_conf(&host_resolv),
        _ => host_resolv,
    }
    .into_bytes();
    let mut hosts =
        b"127.0.0.1\tlocalhost builder\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec();
    for (name, address) in &e.extra_hosts {
        hosts.extend(format!("{}\t{}\n", address, name).bytes());
    }
    let files = [
        ("resolv.conf", resolv),
        ("hosts", hosts),
        ("hostname", b"builder\n".to_vec()),
    ];
    let mut etc_files = Vec::new();
    for (name, data) in files {
        let p = etc.join(name);
        write_mode(&p, &data, 0o644)?;
        etc_files.push((p, format!("/etc/{}", name)));
    }
    let (mut mounts, secret_env) = resolve_mounts(&e.mounts, &mut mount_env, guards)?;
    env.extend(secret_env);
    if let Some(body) = &e.script {
        let p = scratch.join("script");
        write_mode(&p, body.as_bytes(), 0o755)?;
        mounts.push(ExtraMount::Bind {
            source: p,
            target: crate::plan::HEREDOC_SCRIPT_PATH.into(),
            readonly: true,
        });
    }
    Ok(crate::worker::RunSpec {
        root: RootMount::Bind {
            dir: PathBuf::new(),
        },
        argv: e.argv.clone(),
        env,
        cwd: e.cwd.clone(),
        uid,
        gid,
        groups,
        hostname: "builder".into(),
        network,
        insecure,
        etc_files,
        mounts,
        executor,
        process_sandbox,
        terminal: None,
        limits: e.limits.clone(),
    })
}

fn write_mode(p: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    fs::write(p, data)
        .and_then(|_| fs::set_permissions(p, fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("{}: {}", p.display(), e))
}

/// How git reaches a remote for a build: its `GIT_AUTH_TOKEN` secret (as BuildKit) and its
/// default `--ssh` agent.
pub fn git_auth(
    secrets: &BTreeMap<String, SecretSource>,
    ssh: &BTreeMap<String, PathBuf>,
) -> crate::git::GitAuth {
    let token = match secrets.get("GIT_AUTH_TOKEN") {
        Some(SecretSource::File(p)) => fs::read_to_string(p).ok(),
        Some(SecretSource::Env(v)) => std::env::var(v).ok(),
        None => None,
    }
    .map(|t| t.trim().to_string())
    .filter(|t| !t.is_empty());
    crate::git::GitAuth {
        token,
        ssh_agent: ssh.get("default").cloned(),
    }
}
