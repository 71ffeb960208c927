//! Lowering: each stage's instructions become ops. The walk keeps the stage's variables
//! (ARG and ENV scoping) and folds every config change into a typed image state as it goes,
//! so each op is written with the values in effect at its line: expanded words, the shell,
//! working directory, user and environment. ONBUILD triggers of a base run first. Base
//! images' configs come through a [`BaseResolver`], so this runs without a store.

use std::collections::BTreeMap;

use super::graph::{lookup_context, Base, BuildGraph, NamedContext};
use super::history;
use super::scope::{Scope, PROXY_ARGS};
use crate::oci::image::{HealthConfig, ImageState, StoredImage, DEFAULT_PATH};
use crate::oci::platform::Platform;
use crate::plan::{
    default_path_edit, Action, Chmod, Chown, ConfigEdit, CopyOp, CopySource, ExecOp, Input,
    MkdirOp, MountKind, Network, Op, OpGraph, Origin, RunMount, Sharing, Source, StagePlan,
    HEREDOC_SCRIPT_PATH,
};
use crate::syntax::dockerignore::{clean_path, IgnoreMatcher};
use crate::syntax::expand::{LexOptions, Lexer};
use crate::syntax::instruction::{self, Command, Healthcheck, Run};
use crate::syntax::mount::{self, Mount, MountType};
use crate::syntax::parser::{parse_heredoc_word, Heredoc};
use crate::syntax::{Instruction, Located, Span, SyntaxError};

/// Finds the images stages start from (the CLI's pulls from the store or a registry; tests
/// give fixed configs).
pub trait BaseResolver {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<StoredImage, Box<dyn std::error::Error + Send + Sync>>;
}

/// What lowering needs besides the graph.
pub struct LowerOptions<'a> {
    pub file: &'a str,
    pub source: &'a str,
    pub escape: char,
    pub build_args: &'a BTreeMap<String, String>,
    /// The platform the build targets (a stage's `FROM --platform` wins for that stage).
    pub platform: Platform,
    /// `--network`: what a RUN without `--network` gets.
    pub network: Network,
    /// `--add-host`: extra /etc/hosts entries of every RUN.
    pub extra_hosts: Vec<(String, String)>,
    /// `--ulimit` and `--shm-size` of every RUN.
    pub limits: crate::plan::RunLimits,
    /// The bytes lowering has made from the build file so far (expanded words, each RUN's
    /// environment), held under [`MAX_LOWERED_BYTES`].
    pub made: std::cell::Cell<usize>,
}

/// The most a build file may make by lowering: a small file that expands or repeats big
/// values would otherwise take all memory. Real build files make a few MiB at most.
pub const MAX_LOWERED_BYTES: usize = 64 << 20;

/// A lowering failure, at the line that caused it.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    /// A base image could not be had (`at` says why; `cause` keeps the error for its hint).
    #[error("{at}")]
    Base {
        at: SyntaxError,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl LowerError {
    /// The failed base image's error, for the hint it may carry.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LowerError::Base { cause, .. } => Some(cause.as_ref()),
            LowerError::Syntax(_) => None,
        }
    }
}

/// What a lowered stage leaves for the stages built on it.
struct Lowered {
    state: ImageState,
    args: BTreeMap<String, Option<String>>,
}

/// Lower the graph's stages (those the target needs) into ops.
pub fn lower(
    graph: &BuildGraph,
    opts: &LowerOptions,
    resolver: &dyn BaseResolver,
) -> Result<OpGraph, LowerError> {
    let mut done: BTreeMap<usize, Lowered> = BTreeMap::new();
    let mut stages = Vec::new();
    for &i in &graph.order {
        let (plan, lowered) = lower_stage(graph, i, opts, resolver, &done)?;
        done.insert(i, lowered);
        stages.push(plan);
    }
    Ok(OpGraph {
        stages,
        target: graph.target,
    })
}

/// The layer a stage based on the local named context `name` starts with: all its files
/// at `/`, as BuildKit's local source gives them.
fn context_base_op(name: &str, from: &Origin) -> Op {
    Op {
        origin: from.clone(),
        edits: Vec::new(),
        action: Action::Copy(CopyOp::plain(
            Input::Local(name.to_string()),
            ".",
            "/",
            true,
        )),
        history: Some(format!("FROM {} (build context)", name)),
    }
}

fn origin(l: &Located) -> Origin {
    Origin {
        line: l.span.line,
        column: l.span.column,
        text: l.text.clone(),
    }
}

struct StageWalk<'a> {
    graph: &'a BuildGraph,
    opts: &'a LowerOptions<'a>,
    state: ImageState,
    scope: Scope,
    /// Whether a CMD came earlier in the stage (ENTRYPOINT then keeps it).
    cmd_set: bool,
}

fn lower_stage(
    graph: &BuildGraph,
    index: usize,
    opts: &LowerOptions,
    resolver: &dyn BaseResolver,
    done: &BTreeMap<usize, Lowered>,
) -> Result<(StagePlan, Lowered), LowerError> {
    let stage = &graph.stages[index];
    let at = |span: Span, msg: String| {
        SyntaxError::at(opts.file, opts.source, span.line, span.column, msg)
    };
    let platform = stage
        .platform
        .as_deref()
        .and_then(Platform::parse)
        .unwrap_or_else(|| opts.platform.clone());
    let from_origin = Origin {
        line: stage.span.line,
        column: stage.span.column,
        text: opts
            .source
            .lines()
            .nth(stage.span.line.saturating_sub(1))
            .unwrap_or("")
            .trim()
            .to_string(),
    };
    let mut base_edits = Vec::new();
    // A local named context as a base: scratch, with the directory's files as its first
    // layer.
    let mut first_ops = Vec::new();
    if let Base::Context(name) = &stage.base {
        first_ops.push(context_base_op(name, &from_origin));
    }
    let (mut state, args, source) = match &stage.base {
        Base::Scratch | Base::Context(_) => {
            // As BuildKit makes it: working directory `/` and the default PATH (not on
            // Windows, which sets its own).
            base_edits.push(ConfigEdit::WorkingDir { dir: "/".into() });
            if platform.os != "windows" {
                base_edits.push(ConfigEdit::Env {
                    vars: vec![("PATH".into(), DEFAULT_PATH.into())],
                });
            }
            (
                ImageState::scratch(
                    &platform.os,
                    &platform.architecture,
                    platform.variant.as_deref(),
                ),
                BTreeMap::new(),
                Source::Scratch,
            )
        }
        Base::Stage(p) => {
            let parent = done.get(p).ok_or_else(|| {
                at(
                    stage.span,
                    format!("stage {} is not lowered before stage {}", p, index),
                )
            })?;
            (parent.state.clone(), parent.args.clone(), Source::Stage(*p))
        }
        Base::Image(r) => {
            let image = resolver
                .resolve(r, &platform)
                .map_err(|cause| LowerError::Base {
                    at: at(stage.span, format!("FROM {}: {}", r, cause)),
                    cause,
                })?;
            // BuildKit gives a base image without PATH the default one, as it does scratch.
            if platform.os != "windows" {
                base_edits.push(default_path_edit());
            }
            (
                image.state.clone(),
                BTreeMap::new(),
                Source::Image {
                    reference: r.clone(),
                    image: Box::new(image),
                },
            )
        }
    };
    // ONBUILD triggers of the base run first, then are cleared from the child.
    let triggers = state.docker.onbuild.clone().unwrap_or_default();
    if state.docker.onbuild.is_some() {
        base_edits.push(ConfigEdit::ClearOnBuild);
    }
    for e in &base_edits {
        e.apply(&mut state);
    }
    let mut work: Vec<Located> = Vec::new();
    for t in triggers {
        let (_, typed) = crate::syntax::parse_instructions(
            &format!("{} (ONBUILD of the base image)", opts.file),
            &t,
        )?;
        for mut l in typed {
            l.span = stage.span;
            work.push(l);
        }
    }
    work.extend(stage.instructions.iter().cloned());
    let scope = Scope::new(args, state.env());
    let mut walk = StageWalk {
        graph,
        opts,
        state,
        scope,
        cmd_set: false,
    };
    let mut ops = Vec::with_capacity(work.len() + first_ops.len());
    ops.append(&mut first_ops);
    for l in &work {
        let op = walk.lower(l)?;
        for e in &op.edits {
            e.apply(&mut walk.state);
        }
        ops.push(op);
    }
    let mut deps: Vec<usize> = stage.deps.iter().map(|e| e.stage).collect();
    deps.sort_unstable();
    deps.dedup();
    deps.retain(|d| *d != index);
    let plan = StagePlan {
        index,
        name: stage.name.clone(),
        platform,
        source,
        origin: from_origin,
        base_edits,
        ops,
        deps,
    };
    Ok((
        plan,
        Lowered {
            state: walk.state,
            args: walk.scope.args,
        },
    ))
}

impl StageWalk<'_> {
    fn fail(&self, l: &Located, msg: impl Into<String>) -> SyntaxError {
        SyntaxError::at(
            self.opts.file,
            self.opts.source,
            l.span.line,
            l.span.column,
            msg.into(),
        )
    }

    fn word(&self, l: &Located, s: &str) -> Result<String, SyntaxError> {
        let w = self
            .scope
            .word(self.opts.escape, s)
            .map_err(|e| self.fail(l, e.0))?;
        self.made(l, w.len())?;
        Ok(w)
    }

    /// Count `bytes` more made from the build file, or fail at `l` past the limit.
    fn made(&self, l: &Located, bytes: usize) -> Result<(), SyntaxError> {
        let total = self.opts.made.get().saturating_add(bytes);
        self.opts.made.set(total);
        if total > MAX_LOWERED_BYTES {
            return Err(self.fail(
                l,
                format!(
                    "the build file expands to more than {} MiB of values and environments (the limit for one build file)",
                    MAX_LOWERED_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }

    fn opt_word(&self, l: &Located, s: &Option<String>) -> Result<Option<String>, SyntaxError> {
        s.as_ref().map(|x| self.word(l, x)).transpose()
    }

    fn workdir(&self) -> String {
        self.state
            .runtime()
            .working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    }

    fn shell(&self) -> Vec<String> {
        self.state
            .docker
            .shell
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    fn argv(&self, c: &Command) -> Vec<String> {
        match c {
            Command::Exec(a) => a.clone(),
            Command::Shell(s) => {
                let mut shell = self.shell();
                shell.push(s.clone());
                shell
            }
        }
    }

    /// What a `--from` value names: a stage, else an image.
    fn input_of(&self, from: &str) -> Input {
        let stages = &self.graph.stages;
        let by_index = from.parse::<usize>().ok().filter(|i| *i < stages.len());
        let lower = from.to_lowercase();
        match by_index.or_else(|| {
            stages
                .iter()
                .position(|s| s.name.as_deref() == Some(lower.as_str()))
        }) {
            Some(i) => Input::Stage(i),
            None => match lookup_context(&self.graph.contexts, from) {
                Some((_, NamedContext::Image(r))) => Input::Image(r.clone()),
                Some((key, NamedContext::Local)) => Input::Local(key),
                None => Input::Image(from.to_string()),
            },
        }
    }

    /// One instruction as an op whose edits have not been applied yet.
    fn lower(&mut self, l: &Located) -> Result<Op, SyntaxError> {
        let mut edits = Vec::new();
        let mut action = Action::Config;
        let history: Option<String>;
        match &l.instruction {
            Instruction::From { .. } => return Err(self.fail(l, "FROM inside a stage")),
            Instruction::Arg(decls) => {
                let mut shown = Vec::new();
                for (name, default) in decls {
                    // BuildKit's history names the ARG with the default the file gives
                    // (expanded), never a --build-arg value.
                    let default = self.opt_word(l, default)?;
                    match &default {
                        Some(d) => shown.push(format!("{}={}", name, d)),
                        None => shown.push(name.clone()),
                    }
                    let value =
                        match self.opts.build_args.get(name) {
                            Some(v) => Some(v.clone()),
                            None => match default {
                                Some(d) => Some(d),
                                None => {
                                    self.graph.global_args.get(name).cloned().flatten().or_else(
                                        || {
                                            Platform::args(&self.opts.platform, &Platform::host())
                                                .remove(name)
                                        },
                                    )
                                }
                            },
                        };
                    self.scope.declare(name, value);
                }
                history = Some(format!("ARG {}", shown.join(" ")));
            }
            Instruction::Env(kvs) => {
                let mut shown = Vec::new();
                let mut vars = Vec::new();
                for (k, v) in kvs {
                    let k = self.word(l, k)?;
                    let v = self.word(l, v)?;
                    self.scope.set_env(&k, &v);
                    shown.push(format!("{}={}", k, v));
                    vars.push((k, v));
                }
                edits.push(ConfigEdit::Env { vars });
                history = Some(format!("ENV {}", shown.join(" ")));
            }
            Instruction::Label(kvs) => {
                let mut shown = Vec::new();
                let mut labels = Vec::new();
                for (k, v) in kvs {
                    let k = self.word(l, k)?;
                    let v = self.word(l, v)?;
                    shown.push(format!("{}={}", k, v));
                    labels.push((k, v));
                }
                edits.push(ConfigEdit::Labels { labels });
                history = Some(format!("LABEL {}", shown.join(" ")));
            }
            Instruction::Maintainer(m) => {
                let name = self.word(l, m)?;
                history = Some(format!("MAINTAINER {}", name));
                edits.push(ConfigEdit::Author { name });
            }
            Instruction::User(u) => {
                let user = self.word(l, u)?;
                history = Some(format!("USER {}", user));
                edits.push(ConfigEdit::User { user });
            }
            Instruction::Workdir(w) => {
                let w = self.word(l, w)?;
                let cur = self.workdir();
                // As BuildKit: an absolute path is kept as written (a trailing slash too), a
                // relative one is joined to the current directory and cleaned.
                let path = if w.starts_with('/') {
                    w
                } else {
                    clean_path(&format!("/{}/{}", cur, w))
                };
                let dir = clean_path(&path);
                // BuildKit makes the directory (and its parents, owned by USER) as a layer
                // of its own, empty when it exists; only `/` makes none.
                if dir != "/" {
                    action = Action::Mkdir(MkdirOp {
                        dir,
                        owner: self
                            .state
                            .runtime()
                            .user()
                            .clone()
                            .filter(|u| !u.is_empty()),
                    });
                }
                history = Some(format!("WORKDIR {}", path));
                edits.push(ConfigEdit::WorkingDir { dir: path });
            }
            Instruction::Expose(ports) => {
                let mut list = Vec::new();
                for p in ports {
                    for w in self
                        .scope
                        .words(self.opts.escape, p)
                        .map_err(|e| self.fail(l, e.0))?
                    {
                        list.extend(expand_port(&w).map_err(|e| self.fail(l, e))?);
                    }
                }
                history = Some(format!("EXPOSE {}", history::port_map(&list)));
                edits.push(ConfigEdit::ExposePorts { ports: list });
            }
            Instruction::Volume(vols) => {
                let mut paths = Vec::new();
                for v in vols {
                    let v = self.word(l, v)?;
                    if v.trim().is_empty() {
                        return Err(self.fail(l, "VOLUME specified can not be an empty string"));
                    }
                    paths.push(v);
                }
                history = Some(format!("VOLUME {}", history::plain_list(&paths)));
                edits.push(ConfigEdit::Volumes { paths });
            }
            Instruction::Stopsignal(s) => {
                let signal = self.word(l, s)?;
                history = Some(format!("STOPSIGNAL {}", signal));
                edits.push(ConfigEdit::StopSignal { signal });
            }
            Instruction::Shell(sh) => {
                history = Some(format!("SHELL {}", history::plain_list(sh)));
                edits.push(ConfigEdit::Shell { argv: sh.clone() });
            }
            Instruction::Cmd(c) => {
                let argv = self.argv(c);
                self.cmd_set = true;
                history = Some(format!("CMD {}", history::quoted_list(&argv)));
                edits.push(ConfigEdit::Cmd { argv });
            }
            Instruction::Entrypoint(c) => {
                let argv = self.argv(c);
                history = Some(format!("ENTRYPOINT {}", history::quoted_list(&argv)));
                edits.push(ConfigEdit::Entrypoint {
                    argv,
                    keep_cmd: self.cmd_set,
                });
            }
            Instruction::Healthcheck(h) => {
                let config = health_config(h);
                history = Some(history::healthcheck(
                    &config.test,
                    config.interval,
                    config.timeout,
                    config.start_period,
                    config.retries,
                ));
                edits.push(ConfigEdit::Healthcheck { config });
            }
            Instruction::Onbuild(t) => {
                edits.push(ConfigEdit::OnBuild { trigger: t.clone() });
                // BuildKit records no history entry for ONBUILD.
                history = None;
            }
            Instruction::Run(r) => {
                let (exec, created_by) = self.exec(l, r)?;
                action = Action::Exec(exec);
                history = Some(created_by);
            }
            Instruction::Copy(c) | Instruction::Add(c) => {
                let is_add = matches!(l.instruction, Instruction::Add(_));
                let (copy, created_by) = self.copy(l, c, is_add)?;
                action = Action::Copy(copy);
                history = Some(created_by);
            }
        }
        Ok(Op {
            origin: origin(l),
            edits,
            action,
            history,
        })
    }

    fn copy(
        &self,
        l: &Located,
        c: &instruction::Copy,
        is_add: bool,
    ) -> Result<(CopyOp, String), SyntaxError> {
        let mut expanded = Vec::new();
        for s in &c.sources {
            expanded.push(self.word(l, s)?);
        }
        let dest_raw = self.word(l, &c.dest)?;
        // BuildKit's history: the instruction, its expanded sources and destination, no
        // flags.
        let mut shown = String::from(if is_add { "ADD" } else { "COPY" });
        for s in expanded.iter().chain(std::iter::once(&dest_raw)) {
            shown.push(' ');
            shown.push_str(s);
        }
        let dest = if dest_raw.starts_with('/') {
            clean_path(&dest_raw)
        } else {
            clean_path(&format!("{}/{}", self.workdir(), dest_raw))
        };
        let dest_is_dir =
            dest_raw.ends_with('/') || dest_raw.ends_with("/.") || dest_raw == "." || dest == "/";
        let dest = match dest.trim_end_matches('/') {
            "" => "/".to_string(),
            d => d.to_string(),
        };
        let mut sources = Vec::new();
        for s in expanded {
            let doc = parse_heredoc_word(&s)
                .and_then(|(name, ..)| c.heredocs.iter().find(|h| h.name == name));
            if let Some(doc) = doc {
                sources.push(CopySource::Heredoc {
                    name: doc.name.clone(),
                    content: self.heredoc_body(l, doc)?,
                });
            } else if is_add && crate::git::is_git(&s) {
                crate::git::GitSource::parse(&s).map_err(|e| self.fail(l, e))?;
                sources.push(CopySource::Git(s));
            } else if is_add && is_url(&s) {
                sources.push(CopySource::Url(s));
            } else {
                sources.push(CopySource::Path(s));
            }
        }
        if sources.len() > 1 && sources.iter().any(|s| matches!(s, CopySource::Git(_))) {
            return Err(self.fail(l, "ADD of a git repository takes it as its only source"));
        }
        IgnoreMatcher::new(&c.excludes).map_err(|e| self.fail(l, format!("--exclude: {}", e)))?;
        let from = match self.opt_word(l, &c.from)? {
            Some(f) => self.input_of(&f),
            None => Input::Context,
        };
        let op = CopyOp {
            is_add,
            sources,
            from,
            dest,
            dest_is_dir,
            chown: self
                .opt_word(l, &c.chown)?
                .map(|s| Chown::parse(&s).map_err(|e| self.fail(l, format!("--chown: {}", e))))
                .transpose()?,
            chmod: self
                .opt_word(l, &c.chmod)?
                .map(|s| Chmod::parse(&s).map_err(|e| self.fail(l, e)))
                .transpose()?,
            link: c.link,
            parents: c.parents,
            excludes: c.excludes.clone(),
            checksum: c.checksum.clone(),
            unpack: c.unpack,
            keep_git_dir: c.keep_git_dir,
        };
        Ok((op, format!("{} # builder", shown)))
    }

    /// A heredoc's body, expanded unless its delimiter was quoted.
    fn heredoc_body(&self, l: &Located, doc: &Heredoc) -> Result<String, SyntaxError> {
        if !doc.expand {
            return Ok(doc.content.clone());
        }
        let lexer = Lexer::new(
            self.opts.escape,
            LexOptions {
                raw_quotes: true,
                raw_escapes: true,
                skip_unset: false,
            },
        );
        lexer
            .word(&doc.content, &|n| self.scope.get(n))
            .map_err(|e| self.fail(l, e.0))
    }

    fn exec(&self, l: &Located, r: &Run) -> Result<(ExecOp, String), SyntaxError> {
        let (argv, script) = argv_of(r, &self.shell());
        if argv.is_empty() {
            return Err(self.fail(l, "RUN has an empty command"));
        }
        let cwd = self.workdir();
        let mut mounts = Vec::new();
        let mut ssh_mounts = 0;
        for spec in &r.mounts {
            let spec = self.word(l, spec)?;
            let m = Mount::parse(&spec).map_err(|e| self.fail(l, e))?;
            let mut m = self.run_mount(m, &cwd);
            if m.kind == MountKind::Ssh {
                // BuildKit's default: one socket per ssh mount of the step, numbered.
                m.target
                    .get_or_insert_with(|| format!("/run/buildkit/ssh_agent.{}", ssh_mounts));
                ssh_mounts += 1;
            }
            mounts.push(m);
        }
        let network = match r.network {
            None => self.opts.network,
            Some(instruction::Network::Default) => Network::Sandbox,
            Some(instruction::Network::None) => Network::None,
            Some(instruction::Network::Host) => Network::Host,
        };
        let args: Vec<(String, String)> = self
            .scope
            .args
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())))
            .collect();
        // BuildKit's history lists every ARG the stage declared, in order, with its value
        // now (empty when it has none).
        let declared = &self.scope.declared;
        let shown_args = if declared.is_empty() {
            String::new()
        } else {
            format!(
                "|{} {} ",
                declared.len(),
                declared
                    .iter()
                    .map(|k| format!("{}={}", k, self.scope.get(k).unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        let created_by = format!("RUN {}{} # builder", shown_args, argv.join(" "));
        let env = self.env();
        let env_bytes: usize = env
            .iter()
            .chain(&args)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        self.made(l, env_bytes)?;
        let op = ExecOp {
            argv,
            script,
            env,
            cwd,
            user: self.state.runtime().user().clone(),
            mounts,
            network,
            insecure: r.security.as_deref() == Some("insecure"),
            args,
            extra_hosts: self.opts.extra_hosts.clone(),
            limits: self.opts.limits.clone(),
        };
        Ok((op, created_by))
    }

    /// The step's environment: the image's ENV, then ARGs in scope that ENV does not set,
    /// then proxy build args, then a default PATH. HOME is the run's to add.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.state.env();
        for (k, v) in &self.scope.args {
            if let Some(v) = v {
                if !env.iter().any(|(e, _)| e == k) {
                    env.push((k.clone(), v.clone()));
                }
            }
        }
        for (k, v) in self.opts.build_args {
            if PROXY_ARGS.contains(&k.as_str()) && !env.iter().any(|(e, _)| e == k) {
                env.push((k.clone(), v.clone()));
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }

    fn run_mount(&self, m: Mount, cwd: &str) -> RunMount {
        let absolute = |t: &str| {
            if t.starts_with('/') {
                t.to_string()
            } else {
                format!("{}/{}", cwd.trim_end_matches('/'), t)
            }
        };
        let kind = match m.kind {
            MountType::Bind => MountKind::Bind,
            MountType::Cache => MountKind::Cache,
            MountType::Tmpfs => MountKind::Tmpfs,
            MountType::Secret => MountKind::Secret,
            MountType::Ssh => MountKind::Ssh,
        };
        let target = match kind {
            MountKind::Tmpfs => Some(absolute(m.target.as_deref().unwrap_or("/tmp"))),
            MountKind::Cache | MountKind::Bind => {
                Some(absolute(m.target.as_deref().unwrap_or("/")))
            }
            MountKind::Secret | MountKind::Ssh => m.target.as_deref().map(absolute),
        };
        let id = match kind {
            MountKind::Cache => Some(
                m.id.clone()
                    .unwrap_or_else(|| target.clone().unwrap_or_default()),
            ),
            MountKind::Secret => Some(
                m.id.clone()
                    .or_else(|| {
                        m.target.as_ref().and_then(|t| {
                            std::path::Path::new(t)
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                        })
                    })
                    .unwrap_or_default(),
            ),
            MountKind::Ssh => Some(m.id.clone().unwrap_or_else(|| "default".into())),
            _ => m.id.clone(),
        };
        // A secret given as a file (not as env alone) lands at /run/secrets/ID by default.
        let target = match (kind, &target, &m.env) {
            (MountKind::Secret, None, None) => {
                Some(format!("/run/secrets/{}", id.clone().unwrap_or_default()))
            }
            _ => target,
        };
        RunMount {
            kind,
            target,
            source: m.source,
            from: m
                .from
                .as_deref()
                .map_or(Input::Context, |f| self.input_of(f)),
            id,
            readonly: m.readonly,
            sharing: match m.sharing {
                mount::Sharing::Shared => Sharing::Shared,
                mount::Sharing::Private => Sharing::Private,
                mount::Sharing::Locked => Sharing::Locked,
            },
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            required: m.required,
            env: m.env,
            size: m.size,
        }
    }
}

/// Whether an ADD source is a remote URL.
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn health_config(h: &Healthcheck) -> HealthConfig {
    match h {
        Healthcheck::None => HealthConfig {
            test: vec!["NONE".into()],
            ..Default::default()
        },
        Healthcheck::Check {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } => HealthConfig {
            test: match test {
                Command::Exec(a) => std::iter::once("CMD".to_string())
                    .chain(a.iter().cloned())
                    .collect(),
                Command::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
            },
            interval: interval.unwrap_or(0),
            timeout: timeout.unwrap_or(0),
            start_period: start_period.unwrap_or(0),
            start_interval: start_interval.unwrap_or(0),
            retries: retries.unwrap_or(0),
        },
    }
}

/// The argv of a RUN, and a script file to provide when a heredoc has a shebang.
pub fn argv_of(run: &Run, shell: &[String]) -> (Vec<String>, Option<String>) {
    match &run.command {
        Command::Exec(a) => (a.clone(), None),
        Command::Shell(s) => {
            let with_shell = |body: String| -> Vec<String> {
                shell.iter().cloned().chain(std::iter::once(body)).collect()
            };
            if run.heredocs.is_empty() {
                return (with_shell(s.clone()), None);
            }
            let only_heredoc = run.heredocs.len() == 1 && parse_heredoc_word(s.trim()).is_some();
            if only_heredoc {
                let doc = &run.heredocs[0];
                if doc.content.starts_with("#!") {
                    return (
                        vec![HEREDOC_SCRIPT_PATH.to_string()],
                        Some(doc.content.clone()),
                    );
                }
                return (with_shell(doc.content.clone()), None);
            }
            let mut script = s.clone();
            for d in &run.heredocs {
                script.push('\n');
                script.push_str(&d.content);
                script.push_str(&d.name);
            }
            (with_shell(script), None)
        }
    }
}

/// `80`, `80/udp`, `8000-8002/tcp` -> `["80/tcp"]`, ...
fn expand_port(p: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match p.split_once('/') {
        Some((a, b)) => (a, b.to_lowercase()),
        None => (p, "tcp".to_string()),
    };
    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        return Err(format!("invalid protocol {:?} in EXPOSE {}", proto, p));
    }
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a, b),
        None => (ports, ports),
    };
    let lo: u16 = lo
        .parse()
        .map_err(|_| format!("invalid port {:?} in EXPOSE", p))?;
    let hi: u16 = hi
        .parse()
        .map_err(|_| format!("invalid port {:?} in EXPOSE", p))?;
    if hi < lo {
        return Err(format!("invalid port range {:?} in EXPOSE", p));
    }
    Ok((lo..=hi).map(|n| format!("{}/{}", n, proto)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::graph::{lower as lower_graph, PlanOptions};
    use crate::oci::digest::Digest;
    use std::sync::Mutex;

    /// Base images as fixed configs; remembers which platforms were asked for.
    struct Fixed {
        env: Vec<(String, String)>,
        onbuild: Vec<String>,
        asked: Mutex<Vec<String>>,
    }

    impl BaseResolver for Fixed {
        fn resolve(
            &self,
            reference: &str,
            p: &Platform,
        ) -> Result<StoredImage, Box<dyn std::error::Error + Send + Sync>> {
            self.asked
                .lock()
                .unwrap()
                .push(format!("{} {}", reference, p.spec()));
            if reference.starts_with("missing") {
                return Err("not found in the store".into());
            }
            let mut state = ImageState::scratch(&p.os, &p.architecture, None);
            for (k, v) in &self.env {
                state.set_env(k, v);
            }
            if !self.onbuild.is_empty() {
                state.docker.onbuild = Some(self.onbuild.clone());
            }
            let d = Digest::of(reference.as_bytes());
            Ok(StoredImage {
                manifest_digest: d.clone(),
                manifest_size: 0,
                config_digest: d,
                state,
            })
        }
    }

    fn fixed(env: &[(&str, &str)], onbuild: &[&str]) -> Fixed {
        Fixed {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            onbuild: onbuild.iter().map(|s| s.to_string()).collect(),
            asked: Mutex::new(Vec::new()),
        }
    }

    fn ops(text: &str, resolver: &dyn BaseResolver) -> Result<OpGraph, LowerError> {
        let (doc, typed) = crate::syntax::parse_instructions("Buildfile", text)?;
        let opts = PlanOptions {
            target_platform: Platform::parse("linux/amd64").unwrap(),
            ..PlanOptions::default()
        };
        let graph =
            lower_graph("Buildfile", text, doc.escape, &typed, &opts).map_err(|e| match e {
                crate::frontend::graph::PlanError::Syntax(s) => LowerError::Syntax(s),
                other => panic!("{other}"),
            })?;
        lower(
            &graph,
            &LowerOptions {
                file: "Buildfile",
                source: text,
                escape: doc.escape,
                build_args: &BTreeMap::new(),
                platform: opts.target_platform.clone(),
                network: Network::Sandbox,
                extra_hosts: Vec::new(),
                limits: Default::default(),
                made: Default::default(),
            },
            resolver,
        )
    }

    fn exec(op: &Op) -> &ExecOp {
        match &op.action {
            Action::Exec(e) => e,
            other => panic!("not an exec: {other:?}"),
        }
    }

    #[test]
    fn words_expand_with_the_base_env_and_the_stage_scope() {
        let r = fixed(&[("APP", "/app")], &[]);
        let g = ops(
            "FROM base\nARG V=1\nENV DIR=$APP/v$V\nWORKDIR $DIR\nRUN echo $DIR\n",
            &r,
        )
        .unwrap();
        let s = &g.stages[0];
        let run = exec(&s.ops[3]);
        assert_eq!(run.cwd, "/app/v1");
        assert!(run.env.contains(&("DIR".into(), "/app/v1".into())));
        assert!(run.env.contains(&("V".into(), "1".into())));
        assert_eq!(run.argv, vec!["/bin/sh", "-c", "echo $DIR"]);
        assert_eq!(
            s.ops[3].history.as_deref(),
            Some("RUN |1 V=1 /bin/sh -c echo $DIR # builder")
        );
        // The base had no PATH: it gets the default one, as BuildKit gives it.
        assert_eq!(s.base_edits, vec![default_path_edit()]);
    }

    #[test]
    fn a_base_images_onbuild_triggers_run_first_and_are_cleared() {
        let r = fixed(&[], &["ENV T=1", "RUN echo $T"]);
        let g = ops("FROM base\nRUN echo child\n", &r).unwrap();
        let s = &g.stages[0];
        assert!(s.base_edits.contains(&ConfigEdit::ClearOnBuild));
        let texts: Vec<&str> = s.ops.iter().map(|o| o.origin.text.as_str()).collect();
        assert_eq!(texts, vec!["ENV T=1", "RUN echo $T", "RUN echo child"]);
        assert!(exec(&s.ops[1]).env.contains(&("T".into(), "1".into())));
        // Triggers are located at the FROM line.
        assert_eq!(s.ops[0].origin.line, 1);
    }

    #[test]
    fn from_platform_reaches_the_resolver_and_the_stage() {
        let r = fixed(&[], &[]);
        let g = ops(
            "FROM --platform=linux/arm64 base AS build\nFROM base\nCOPY --from=build /a /a\n",
            &r,
        )
        .unwrap();
        assert_eq!(g.stages[0].platform.spec(), "linux/arm64");
        assert_eq!(g.stages[1].platform.spec(), "linux/amd64");
        assert_eq!(
            *r.asked.lock().unwrap(),
            vec!["base linux/arm64", "base linux/amd64"]
        );
        match &g.stages[1].ops[0].action {
            Action::Copy(c) => assert_eq!(c.from, Input::Stage(0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_name_the_line() {
        let r = fixed(&[], &[]);
        let e = ops("FROM scratch\nEXPOSE 80/xyz\n", &r)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Buildfile:2:1: invalid protocol"), "{e}");
        let e = ops("FROM scratch\n\nFROM missing:1\n", &r)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Buildfile:3:1: FROM missing:1: not found"),
            "{e}"
        );
    }

    #[test]
    fn entrypoint_keeps_only_a_cmd_of_its_own_stage() {
        let r = fixed(&[], &[]);
        let g = ops(
            "FROM scratch\nENTRYPOINT [\"/a\"]\nCMD [\"x\"]\nENTRYPOINT [\"/b\"]\n",
            &r,
        )
        .unwrap();
        let eps: Vec<&ConfigEdit> = g.stages[0].ops.iter().flat_map(|o| &o.edits).collect();
        assert_eq!(
            eps[0],
            &ConfigEdit::Entrypoint {
                argv: vec!["/a".into()],
                keep_cmd: false
            }
        );
        assert_eq!(
            eps[2],
            &ConfigEdit::Entrypoint {
                argv: vec!["/b".into()],
                keep_cmd: true
            }
        );
    }
}
