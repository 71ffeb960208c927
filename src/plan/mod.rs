//! The op graph: what a build does, as typed and fully resolved operations, one list per
//! stage. The frontend makes it from a build file; the solver runs it and knows nothing of
//! build-file text. Every field is a value (variables expanded, paths absolute, defaults
//! filled in); the only things left to the run are what needs the image's files (user and
//! group names, whether a directory exists) and the content of inputs (the context, other
//! stages, images).
//!
//! An op's [`Op::cache_key`] is a canonical JSON encoding of its semantic fields, versioned
//! by [`OP_KEY_VERSION`]; its [`Origin`] (line, column, text) is left out. The solver chains
//! it with the keys and digests of the op's inputs.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub mod perms;

pub use perms::{Chmod, Chown, Id};

use crate::oci::digest::Digest;
use crate::oci::image::{canonical_json, HealthConfig, ImageState, StoredImage, DEFAULT_PATH};
use crate::oci::platform::Platform;

/// Bumped whenever an op's encoding, or what running it means, changes: older keys then
/// miss instead of hitting wrongly.
pub const OP_KEY_VERSION: u32 = 2;

/// Where a RUN's heredoc script with a shebang is provided inside the step (on /dev's tmpfs,
/// never in a layer).
pub const HEREDOC_SCRIPT_PATH: &str = "/dev/.builder-heredoc-script";

/// Where an op comes from in the build file: for errors and progress, never for keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub line: usize,
    pub column: usize,
    /// The instruction as written (an ONBUILD trigger's own text).
    pub text: String,
}

/// A change to the image config, applied in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "edit", rename_all = "snake_case")]
pub enum ConfigEdit {
    /// Set or replace environment variables (first position kept).
    Env {
        vars: Vec<(String, String)>,
    },
    /// Set a variable the image does not have (a base image's default PATH).
    DefaultEnv {
        key: String,
        value: String,
    },
    Labels {
        labels: Vec<(String, String)>,
    },
    Author {
        name: String,
    },
    User {
        user: String,
    },
    WorkingDir {
        dir: String,
    },
    /// Add exposed ports (`80/tcp` form); the set stays sorted.
    ExposePorts {
        ports: Vec<String>,
    },
    /// Add volumes; the set stays sorted.
    Volumes {
        paths: Vec<String>,
    },
    StopSignal {
        signal: String,
    },
    Shell {
        argv: Vec<String>,
    },
    Cmd {
        argv: Vec<String>,
    },
    /// Set the entrypoint; without `keep_cmd` (no CMD earlier in the stage) the CMD is
    /// cleared.
    Entrypoint {
        argv: Vec<String>,
        keep_cmd: bool,
    },
    Healthcheck {
        config: HealthConfig,
    },
    OnBuild {
        trigger: String,
    },
    /// Drop the inherited ONBUILD triggers (they ran at the start of this stage).
    ClearOnBuild,
}

impl ConfigEdit {
    /// Apply to `state`.
    pub fn apply(&self, state: &mut ImageState) {
        match self {
            ConfigEdit::Env { vars } => {
                for (k, v) in vars {
                    state.set_env(k, v);
                }
            }
            ConfigEdit::DefaultEnv { key, value } => {
                if !state.env().iter().any(|(k, _)| k == key) {
                    state.set_env(key, value);
                }
            }
            ConfigEdit::Labels { labels } => state.with_runtime(|c| {
                let all = c.labels_mut().get_or_insert_with(Default::default);
                for (k, v) in labels {
                    all.insert(k.clone(), v.clone());
                }
            }),
            ConfigEdit::Author { name } => {
                state.config.set_author(Some(name.clone()));
            }
            ConfigEdit::User { user } => state.with_runtime(|c| {
                c.set_user(Some(user.clone()));
            }),
            ConfigEdit::WorkingDir { dir } => state.with_runtime(|c| {
                c.set_working_dir(Some(dir.clone()));
            }),
            ConfigEdit::ExposePorts { ports } => state.with_runtime(|c| {
                let mut all = c.exposed_ports().clone().unwrap_or_default();
                all.extend(ports.iter().cloned());
                all.sort();
                all.dedup();
                c.set_exposed_ports(Some(all));
            }),
            ConfigEdit::Volumes { paths } => state.with_runtime(|c| {
                let mut all = c.volumes().clone().unwrap_or_default();
                all.extend(paths.iter().cloned());
                all.sort();
                all.dedup();
                c.set_volumes(Some(all));
            }),
            ConfigEdit::StopSignal { signal } => state.with_runtime(|c| {
                c.set_stop_signal(Some(signal.clone()));
            }),
            ConfigEdit::Shell { argv } => state.docker.shell = Some(argv.clone()),
            ConfigEdit::Cmd { argv } => {
                state.with_runtime(|c| {
                    c.set_cmd(Some(argv.clone()));
                });
                // As BuildKit's dispatchCmd (frontend/dockerfile/dockerfile2llb/convert.go)
                // since v0.11: `ArgsEscaped: true` whenever CMD is set.
                state.docker.args_escaped = Some(true);
            }
            ConfigEdit::Entrypoint { argv, keep_cmd } => state.with_runtime(|c| {
                c.set_entrypoint(Some(argv.clone()));
                if !keep_cmd {
                    c.set_cmd(None);
                }
            }),
            ConfigEdit::Healthcheck { config } => state.docker.healthcheck = Some(config.clone()),
            ConfigEdit::OnBuild { trigger } => state
                .docker
                .onbuild
                .get_or_insert_with(Vec::new)
                .push(trigger.clone()),
            ConfigEdit::ClearOnBuild => state.docker.onbuild = None,
        }
    }
}

/// Where an op reads files from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// The build context (`.dockerignore` applied).
    Context,
    /// An earlier stage's result, by index.
    Stage(usize),
    /// An image, by reference (fetched when the op runs).
    Image(String),
    /// A local directory given as `--build-context NAME=DIR` (its own `.dockerignore`
    /// applied), by name.
    Local(String),
}

/// One source of a COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopySource {
    /// A path or glob in the op's input.
    Path(String),
    /// A URL (ADD only).
    Url(String),
    /// A git repository, `REMOTE[#REF[:SUBDIR]]` (ADD only); the commit its ref resolves
    /// to is one of the step's inputs.
    Git(String),
    /// A heredoc file, its body expanded where the delimiter was unquoted.
    Heredoc { name: String, content: String },
}

/// COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyOp {
    pub is_add: bool,
    pub sources: Vec<CopySource>,
    pub from: Input,
    /// Absolute destination, clean (no trailing `/`).
    pub dest: String,
    /// Whether the destination names a directory to copy into (written with a trailing `/`
    /// or `/.`, or the root); otherwise a single file source is copied onto it.
    pub dest_is_dir: bool,
    /// `--chown`; names are resolved against the image's passwd and group files when it runs.
    pub chown: Option<Chown>,
    pub chmod: Option<Chmod>,
    pub link: bool,
    pub parents: bool,
    pub excludes: Vec<String>,
    pub checksum: Option<String>,
    pub unpack: Option<bool>,
    pub keep_git_dir: bool,
}

impl CopyOp {
    /// `COPY` of one path with no flags.
    pub fn plain(from: Input, source: &str, dest: &str, dest_is_dir: bool) -> CopyOp {
        CopyOp {
            is_add: false,
            sources: vec![CopySource::Path(source.into())],
            from,
            dest: dest.into(),
            dest_is_dir,
            chown: None,
            chmod: None,
            link: false,
            parents: false,
            excludes: Vec::new(),
            checksum: None,
            unpack: None,
            keep_git_dir: false,
        }
    }

    /// The context paths it reads (what its key digests).
    pub fn paths(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                CopySource::Path(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether it fetches a URL whose content is unknown until fetched (no `--checksum`).
    pub fn fetches_unpinned(&self) -> bool {
        self.checksum.is_none() && self.urls().next().is_some()
    }

    pub fn urls(&self) -> impl Iterator<Item = &String> {
        self.sources.iter().filter_map(|s| match s {
            CopySource::Url(u) => Some(u),
            _ => None,
        })
    }
}

/// The kind of a RUN mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    /// An ssh agent's socket, forwarded from `--ssh`.
    Ssh,
}

/// Who may use a cache mount at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// One `RUN --mount`, resolved: targets are absolute, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMount {
    pub kind: MountKind,
    /// Absolute; `None` only for a secret given as an environment variable alone.
    pub target: Option<String>,
    pub source: Option<String>,
    /// A bind's files: the context unless it names a stage or image.
    pub from: Input,
    pub id: Option<String>,
    pub readonly: bool,
    pub sharing: Sharing,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub required: bool,
    pub env: Option<String>,
    pub size: Option<u64>,
}

/// A RUN step's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Its own network namespace with user-mode networking.
    Sandbox,
    /// Loopback only.
    None,
    /// The host's network (needs `--allow network.host`).
    Host,
}

/// RUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    pub argv: Vec<String>,
    /// A heredoc script with a shebang, provided at [`HEREDOC_SCRIPT_PATH`].
    pub script: Option<String>,
    /// The environment but HOME, which comes from the user's passwd entry when unset.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// The USER in effect, resolved against the image's passwd file when it runs.
    pub user: Option<String>,
    pub mounts: Vec<RunMount>,
    pub network: Network,
    pub insecure: bool,
    /// The build args in scope with a value (provenance names them).
    pub args: Vec<(String, String)>,
    /// `--add-host`: names the step's /etc/hosts gives, with their addresses (a step without
    /// any keeps the key it always had).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<(String, String)>,
    /// `--ulimit` and `--shm-size` (a step with neither keeps the key it always had).
    #[serde(default, skip_serializing_if = "RunLimits::is_default")]
    pub limits: RunLimits,
}

/// The resource limits of every RUN: `--ulimit`s and `--shm-size`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLimits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<Ulimit>,
    /// The size of /dev/shm in bytes (default 64 MiB, as docker's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
}

impl RunLimits {
    pub fn is_default(&self) -> bool {
        self.ulimits.is_empty() && self.shm_size.is_none()
    }
}

/// One `--ulimit NAME=SOFT[:HARD]`; -1 is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// Docker's name: `nofile`, `nproc`, `core`, `stack`, …
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

/// The names `--ulimit` takes, as docker's (`RLIMIT_` and the name, upper-cased, is the
/// resource).
pub const ULIMIT_NAMES: [&str; 15] = [
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

impl Ulimit {
    /// `NAME=SOFT[:HARD]`, as docker's `--ulimit`.
    pub fn parse(s: &str) -> Result<Ulimit, String> {
        let bad = |why: &str| format!("invalid --ulimit {:?}: {}", s, why);
        let (name, values) = s
            .split_once('=')
            .ok_or_else(|| bad("want NAME=SOFT[:HARD]"))?;
        let name = name.trim().to_lowercase();
        if !ULIMIT_NAMES.contains(&name.as_str()) {
            return Err(bad(&format!(
                "unknown limit; one of {}",
                ULIMIT_NAMES.join(", ")
            )));
        }
        let number = |v: &str| -> Result<i64, String> {
            match v.trim().parse::<i64>() {
                Ok(n) if n >= -1 => Ok(n),
                _ => Err(bad(&format!(
                    "{:?} is not a number (or -1 for unlimited)",
                    v
                ))),
            }
        };
        let (soft, hard) = match values.split_once(':') {
            Some((s, h)) => (number(s)?, number(h)?),
            None => {
                let n = number(values)?;
                (n, n)
            }
        };
        let limit = Ulimit { name, soft, hard };
        let (soft, hard) = limit.values();
        if soft > hard {
            return Err(bad("the soft limit is above the hard limit"));
        }
        Ok(limit)
    }

    /// The resource's limits as the kernel takes them (-1: `RLIM_INFINITY`).
    pub fn values(&self) -> (u64, u64) {
        let of = |n: i64| if n < 0 { u64::MAX } else { n as u64 };
        (of(self.soft), of(self.hard))
    }
}

/// WORKDIR's layer: the directory, made with its missing parents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MkdirOp {
    /// Absolute and clean.
    pub dir: String,
    /// The USER that owns created directories.
    pub owner: Option<String>,
}

/// What an op does to the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Action {
    /// Nothing: the op changes the config (and history) only.
    Config,
    Mkdir(MkdirOp),
    Copy(CopyOp),
    Exec(ExecOp),
}

/// One step of a stage: config edits, then an action, then a history entry (with the
/// action's layer, if it makes one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    #[serde(skip)]
    pub origin: Origin,
    pub edits: Vec<ConfigEdit>,
    pub action: Action,
    /// `None`: no history entry (ONBUILD records none).
    pub history: Option<String>,
}

impl Op {
    /// Whether the op writes a layer (and so is cached on its own).
    pub fn is_layered(&self) -> bool {
        !matches!(self.action, Action::Config)
    }

    /// The op's own key: its semantic fields, canonically encoded and versioned.
    pub fn cache_key(&self) -> Digest {
        Digest::of(&canonical_json(&self.key_material()))
    }

    /// What [`Op::cache_key`] hashes.
    pub fn key_material(&self) -> Value {
        json!({"v": OP_KEY_VERSION, "op": self})
    }
}

/// What a stage starts from.
#[derive(Debug, Clone)]
pub enum Source {
    Scratch,
    /// An image, resolved (its config is what the frontend lowered against).
    Image {
        reference: String,
        image: Box<StoredImage>,
    },
    /// An earlier stage's result.
    Stage(usize),
}

impl Source {
    /// What the source stands for in a key, and in listings.
    pub fn identity(&self, platform: &Platform) -> Value {
        match self {
            Source::Scratch => json!({"scratch": platform.spec()}),
            Source::Image { image, .. } => {
                json!({"image": image.manifest_digest.to_string()})
            }
            Source::Stage(i) => json!({ "stage": i }),
        }
    }
}

/// One stage, lowered.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub index: usize,
    /// The `AS` name, lowercased.
    pub name: Option<String>,
    pub platform: Platform,
    pub source: Source,
    /// The FROM line.
    pub origin: Origin,
    /// Applied to the source's config before the first op (a default PATH, ONBUILD triggers
    /// cleared).
    pub base_edits: Vec<ConfigEdit>,
    pub ops: Vec<Op>,
    /// Stages whose results this stage reads.
    pub deps: Vec<usize>,
}

impl StagePlan {
    /// `name` if it has one, else its index: how users refer to it.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.index.to_string())
    }

    /// Images the stage reads (its source and every `--from` image).
    pub fn images(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Source::Image { reference, .. } = &self.source {
            out.push(reference.clone());
        }
        for op in &self.ops {
            let inputs: Vec<&Input> = match &op.action {
                Action::Copy(c) => vec![&c.from],
                Action::Exec(e) => e.mounts.iter().map(|m| &m.from).collect(),
                _ => Vec::new(),
            };
            for i in inputs {
                if let Input::Image(r) = i {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

/// A build, lowered for one platform.
#[derive(Debug, Clone)]
pub struct OpGraph {
    /// The stages the target needs, in dependency order (target last).
    pub stages: Vec<StagePlan>,
    /// The target stage's index.
    pub target: usize,
}

impl OpGraph {
    pub fn stage(&self, index: usize) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.index == index)
    }

    /// The listing `builder debug ops` prints: each stage, then each op with its line, its
    /// key and its fields.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        for s in &self.stages {
            let target = if s.index == self.target {
                " (target)"
            } else {
                ""
            };
            let name = s
                .name
                .as_ref()
                .map(|n| format!(" {}", n))
                .unwrap_or_default();
            out.push_str(&format!(
                "stage {}{}{}: {} from {}\n",
                s.index,
                name,
                target,
                s.platform.spec(),
                compact(&s.source.identity(&s.platform)),
            ));
            for e in &s.base_edits {
                out.push_str(&format!("  base {}\n", compact(&json!(e))));
            }
            for op in &s.ops {
                let key = op.cache_key().hex()[..16].to_string();
                let mut fields = json!(op);
                let action = fields["action"].take();
                out.push_str(&format!(
                    "  {}:{} {} key={}\n",
                    op.origin.line,
                    op.origin.column,
                    action["op"].as_str().unwrap_or("?"),
                    key
                ));
                if let Value::Object(mut a) = action {
                    a.remove("op");
                    if !a.is_empty() {
                        out.push_str(&format!("    {}\n", compact(&Value::Object(a))));
                    }
                }
                for e in &op.edits {
                    out.push_str(&format!("    edit {}\n", compact(&json!(e))));
                }
                if let Some(h) = &op.history {
                    out.push_str(&format!("    history {}\n", compact(&json!(h))));
                }
            }
        }
        out
    }
}

/// One-line canonical JSON.
fn compact(v: &Value) -> String {
    String::from_utf8_lossy(&canonical_json(v)).into_owned()
}

/// The default PATH a base without one gets.
pub fn default_path_edit() -> ConfigEdit {
    ConfigEdit::DefaultEnv {
        key: "PATH".into(),
        value: DEFAULT_PATH.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(action: Action, line: usize) -> Op {
        Op {
            origin: Origin {
                line,
                column: 1,
                text: format!("line {}", line),
            },
            edits: Vec::new(),
            action,
            history: Some("X".into()),
        }
    }

    #[test]
    fn key_ignores_origin_and_sees_fields() {
        let mk = MkdirOp {
            dir: "/a".into(),
            owner: None,
        };
        let a = op(Action::Mkdir(mk.clone()), 1);
        let b = op(Action::Mkdir(mk.clone()), 9);
        assert_eq!(a.cache_key(), b.cache_key());
        let c = op(
            Action::Mkdir(MkdirOp {
                owner: Some("app".into()),
                ..mk
            }),
            1,
        );
        assert_ne!(a.cache_key(), c.cache_key());
        assert_eq!(a.key_material()["v"], json!(OP_KEY_VERSION));
    }

    #[test]
    fn edits_apply_in_order() {
        let mut s = ImageState::scratch("linux", "amd64", None);
        ConfigEdit::Cmd {
            argv: vec!["a".into()],
        }
        .apply(&mut s);
        ConfigEdit::Entrypoint {
            argv: vec!["e".into()],
            keep_cmd: false,
        }
        .apply(&mut s);
        assert!(s.runtime().cmd().is_none());
        default_path_edit().apply(&mut s);
        ConfigEdit::DefaultEnv {
            key: "PATH".into(),
            value: "/x".into(),
        }
        .apply(&mut s);
        assert_eq!(
            s.env(),
            vec![("PATH".to_string(), DEFAULT_PATH.to_string())]
        );
    }
}
