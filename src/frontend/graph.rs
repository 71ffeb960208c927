//! The build graph: a build file's stages as nodes, `FROM <stage>`, `COPY --from` and
//! `RUN --mount=from=` as edges. Lowering resolves global ARGs for FROM lines, names stages,
//! prunes what `--target` does not need, rejects unknown stages and cycles with the line that
//! caused them, and groups the remaining stages into levels that can run in parallel.

use std::collections::{BTreeMap, BTreeSet};

use super::scope::{Platform, Scope, PROXY_ARGS};
use crate::syntax::mount::Mount;
use crate::syntax::{Instruction, Located, Span, SyntaxError};

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    Scratch,
    /// An image reference, after ARG expansion.
    Image(String),
    /// An earlier stage, by index.
    Stage(usize),
    /// A local directory given as `--build-context NAME=DIR`, by its looked-up name: the
    /// stage starts from scratch with the directory's files as its first layer.
    Context(String),
}

/// What `--build-context NAME=VALUE` puts in place of NAME wherever FROM, `COPY --from` or
/// `RUN --mount=from` names it (a stage of that name included).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NamedContext {
    /// An image reference as FROM reads it (a registry or store name, `oci:DIR[:TAG]`).
    Image(String),
    /// A local directory.
    Local,
}

/// How a context name is looked up, as BuildKit does: a name that parses as an image
/// reference in docker's short form without `:latest` (`docker.io/library/alpine:latest`
/// is `alpine`), any other lowercased.
pub fn context_name(name: &str) -> String {
    match crate::registry::Reference::parse(name) {
        Ok(r) => {
            let f = r.familiar();
            f.strip_suffix(":latest").map(str::to_string).unwrap_or(f)
        }
        Err(_) => name.to_lowercase(),
    }
}

/// Why one stage depends on another.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Edge {
    pub stage: usize,
    pub line: usize,
}

/// One stage of the build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stage {
    pub index: usize,
    /// The `AS` name, lowercased.
    pub name: Option<String>,
    pub base: Base,
    /// `FROM --platform`, expanded.
    pub platform: Option<String>,
    /// The FROM line.
    pub span: Span,
    /// The instructions after FROM.
    pub instructions: Vec<Located>,
    /// Stages whose results this stage reads (base stage included).
    pub deps: Vec<Edge>,
    /// Images (not stages) named by `COPY --from` or `RUN --mount=from=`.
    pub image_refs: Vec<String>,
}

impl Stage {
    /// `name` if it has one, else its index: how users refer to it.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.index.to_string())
    }
}

/// What the planner needs from the command line.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub target: Option<String>,
    pub build_args: BTreeMap<String, String>,
    pub target_platform: Platform,
    pub build_platform: Platform,
    /// `--build-context`s, by [`context_name`].
    pub contexts: BTreeMap<String, NamedContext>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            target: None,
            build_args: BTreeMap::new(),
            target_platform: Platform::host(),
            build_platform: Platform::host(),
            contexts: BTreeMap::new(),
        }
    }
}

/// The lowered build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildGraph {
    /// Every stage of the file, in order.
    pub stages: Vec<Stage>,
    /// The stage the build produces.
    pub target: usize,
    /// The stages the target needs, in dependency order (target last).
    pub order: Vec<usize>,
    /// `order` grouped into levels: stages in one level do not depend on each other.
    pub levels: Vec<Vec<usize>>,
    /// Global ARGs (before the first FROM) with their values.
    pub global_args: BTreeMap<String, Option<String>>,
    /// `--build-arg`s no ARG consumes (a warning, as in docker).
    pub unused_build_args: Vec<String>,
    /// `--build-context`s, by [`context_name`].
    pub contexts: BTreeMap<String, NamedContext>,
}

/// The named context that stands for `name`, if any, with the name it is looked up by.
pub fn lookup_context<'c>(
    contexts: &'c BTreeMap<String, NamedContext>,
    name: &str,
) -> Option<(String, &'c NamedContext)> {
    if contexts.is_empty() {
        return None;
    }
    let key = context_name(name);
    contexts.get(&key).map(|c| (key, c))
}

/// A stage's base when a named context stands for `name`.
fn context_base(contexts: &BTreeMap<String, NamedContext>, name: &str) -> Option<Base> {
    lookup_context(contexts, name).map(|(key, c)| match c {
        NamedContext::Image(r) => Base::Image(r.clone()),
        NamedContext::Local => Base::Context(key),
    })
}

/// A planning failure. Location-bearing failures are [`SyntaxError`]s.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("target stage {0:?} could not be found (stages: {1})")]
    UnknownTarget(String, String),
}

/// Lower typed instructions into a build graph.
/// The most stages one build file may have. A chain of stages carries every earlier stage's
/// layers and settings forward, so work grows with the square of a chain's length; real
/// builds have a few dozen stages at most.
pub const MAX_STAGES: usize = 512;

pub fn lower(
    file: &str,
    source: &str,
    escape: char,
    instructions: &[Located],
    opts: &PlanOptions,
) -> Result<BuildGraph, PlanError> {
    let at = |span: Span, msg: String| SyntaxError::at(file, source, span.line, span.column, msg);
    let platform_args = Platform::args(&opts.target_platform, &opts.build_platform);

    // Global ARGs: visible to FROM lines only (until a stage redeclares them).
    let mut global = Scope::default();
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    let mut idx = 0;
    for (k, v) in &platform_args {
        global.args.insert(k.clone(), Some(v.clone()));
    }
    let mut global_args = BTreeMap::new();
    while let Some(l) = instructions.get(idx) {
        match &l.instruction {
            Instruction::Arg(decls) => {
                for (name, default) in decls {
                    let value = match opts.build_args.get(name) {
                        Some(v) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(global.word(escape, d).map_err(|e| at(l.span, e.0))?),
                            None => None,
                        },
                    };
                    consumed.insert(name.clone());
                    global.args.insert(name.clone(), value.clone());
                    global_args.insert(name.clone(), value);
                }
            }
            Instruction::From { .. } => break,
            other => {
                let _ = other;
                return Err(at(l.span, "no build stage in current context: a build file must start with FROM (only ARG may come before it)".into()).into());
            }
        }
        idx += 1;
    }

    // Split stages.
    let mut stages: Vec<Stage> = Vec::new();
    let mut names: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    // Whether a named context stands for the stage being split: its instructions are not
    // run (BuildKit's `noinit`).
    let mut replaced = false;
    for l in &instructions[idx..] {
        if let Instruction::From {
            image,
            alias,
            platform,
        } = &l.instruction
        {
            let image = global.word(escape, image).map_err(|e| at(l.span, e.0))?;
            if image.is_empty() {
                return Err(at(
                    l.span,
                    "FROM names an empty image (check the ARG it uses)".into(),
                )
                .into());
            }
            let platform = match platform {
                Some(p) => Some(global.word(escape, p).map_err(|e| at(l.span, e.0))?),
                None => None,
            };
            let index = stages.len();
            if index >= MAX_STAGES {
                return Err(at(
                    l.span,
                    format!(
                        "more than {} stages in one build file (the limit of stages)",
                        MAX_STAGES
                    ),
                )
                .into());
            }
            if let Some(name) = alias {
                if let Some((_, line)) = names.get(name) {
                    return Err(at(
                        l.span,
                        format!(
                            "duplicate stage name {:?}, first defined on line {}",
                            name, line
                        ),
                    )
                    .into());
                }
                names.insert(name.clone(), (index, l.span.line));
            }
            let lower_image = image.to_lowercase();
            let mut deps = Vec::new();
            let by_alias = alias
                .as_deref()
                .and_then(|a| context_base(&opts.contexts, a));
            replaced = by_alias.is_some();
            let base = if let Some(b) = by_alias {
                b
            } else if lower_image == "scratch" {
                Base::Scratch
            } else if let Some((i, _)) = names.get(&lower_image).filter(|(i, _)| *i != index) {
                deps.push(Edge {
                    stage: *i,
                    line: l.span.line,
                });
                Base::Stage(*i)
            } else if let Some(b) = context_base(&opts.contexts, &image) {
                b
            } else {
                Base::Image(image)
            };
            stages.push(Stage {
                index,
                name: alias.clone(),
                base,
                platform,
                span: l.span,
                instructions: Vec::new(),
                deps,
                image_refs: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut().filter(|_| !replaced) {
            stage.instructions.push(l.clone());
        }
    }

    // Edges from COPY --from and RUN --mount=from, expanded with the stage's ARGs and ENV.
    let count = stages.len();
    for stage in stages.iter_mut() {
        let mut scope = Scope::default();
        for l in &stage.instructions {
            let mut refs: Vec<String> = Vec::new();
            match &l.instruction {
                Instruction::Arg(decls) => {
                    for (name, default) in decls {
                        consumed.insert(name.clone());
                        let value = match opts.build_args.get(name) {
                            Some(v) => Some(v.clone()),
                            None => match default {
                                Some(d) => {
                                    Some(scope.word(escape, d).map_err(|e| at(l.span, e.0))?)
                                }
                                None => global.args.get(name).cloned().flatten(),
                            },
                        };
                        scope.args.insert(name.clone(), value);
                    }
                }
                Instruction::Env(kvs) => {
                    for (k, v) in kvs {
                        let k = scope.word(escape, k).map_err(|e| at(l.span, e.0))?;
                        let v = scope.word(escape, v).map_err(|e| at(l.span, e.0))?;
                        scope.set_env(&k, &v);
                    }
                }
                Instruction::Copy(c) => {
                    if let Some(f) = &c.from {
                        refs.push(scope.word(escape, f).map_err(|e| at(l.span, e.0))?);
                    }
                }
                Instruction::Run(r) => {
                    for m in &r.mounts {
                        let spec = scope.word(escape, m).map_err(|e| at(l.span, e.0))?;
                        let mount = Mount::parse(&spec).map_err(|e| at(l.span, e))?;
                        if let Some(f) = mount.from {
                            refs.push(f);
                        }
                    }
                }
                _ => {}
            }
            for r in refs {
                let lower = r.to_lowercase();
                if let Ok(i) = r.parse::<usize>() {
                    if i >= count {
                        return Err(at(
                            l.span,
                            format!(
                                "--from={} names stage index {} but the file has {} stages",
                                r, i, count
                            ),
                        )
                        .into());
                    }
                    stage.deps.push(Edge {
                        stage: i,
                        line: l.span.line,
                    });
                } else if let Some((i, _)) = names.get(&lower) {
                    stage.deps.push(Edge {
                        stage: *i,
                        line: l.span.line,
                    });
                } else {
                    match context_base(&opts.contexts, &r) {
                        Some(Base::Image(image)) => stage.image_refs.push(image),
                        Some(_) => {}
                        None => stage.image_refs.push(r),
                    }
                }
            }
        }
    }

    // Target and pruning.
    let target = match &opts.target {
        None => count
            .checked_sub(1)
            .ok_or_else(|| at(Span::default(), "the file has no stage".into()))?,
        Some(t) => match names.get(&t.to_lowercase()) {
            Some((i, _)) => *i,
            None => {
                let all: Vec<String> = stages.iter().filter_map(|s| s.name.clone()).collect();
                return Err(PlanError::UnknownTarget(
                    t.clone(),
                    if all.is_empty() {
                        "none named".into()
                    } else {
                        all.join(", ")
                    },
                ));
            }
        },
    };
    let mut order = Vec::new();
    let mut state = vec![0u8; count]; // 0 new, 1 visiting, 2 done
    visit(target, &stages, &mut state, &mut order, &mut Vec::new()).map_err(|(line, path)| {
        let span = Span {
            line,
            column: 1,
            end_line: line,
        };
        let col = source
            .lines()
            .nth(line.saturating_sub(1))
            .map(|l| l.len() - l.trim_start().len() + 1)
            .unwrap_or(1);
        at(
            Span {
                column: col,
                ..span
            },
            format!("circular dependency between stages: {}", path),
        )
    })?;

    // FROM --platform: the stage builds for that platform (the cross-compile pattern); it
    // must name one.
    for &s in &order {
        if let Some(p) = &stages[s].platform {
            if Platform::parse(p).is_none() {
                return Err(at(
                    stages[s].span,
                    format!(
                        "FROM --platform={}: not a platform (want os/arch[/variant])",
                        p
                    ),
                )
                .into());
            }
        }
    }

    let mut level_of = vec![0usize; count];
    let mut levels: Vec<Vec<usize>> = Vec::new();
    for &s in &order {
        let l = stages[s]
            .deps
            .iter()
            .map(|e| level_of[e.stage] + 1)
            .max()
            .unwrap_or(0);
        level_of[s] = l;
        if levels.len() <= l {
            levels.resize(l + 1, Vec::new());
        }
        levels[l].push(s);
    }

    let unused_build_args = opts
        .build_args
        .keys()
        // `BUILDKIT_*` args are options to the frontend (`BUILDKIT_DOCKERFILE_CHECK`).
        .filter(|k| {
            !consumed.contains(*k)
                && !PROXY_ARGS.contains(&k.as_str())
                && !k.starts_with("BUILDKIT_")
        })
        .cloned()
        .collect();
    Ok(BuildGraph {
        stages,
        target,
        order,
        levels,
        global_args,
        unused_build_args,
        contexts: opts.contexts.clone(),
    })
}

/// Depth-first post-order; on a cycle returns the line of the closing edge and the path.
fn visit(
    s: usize,
    stages: &[Stage],
    state: &mut Vec<u8>,
    order: &mut Vec<usize>,
    path: &mut Vec<usize>,
) -> Result<(), (usize, String)> {
    state[s] = 1;
    path.push(s);
    let mut deps: Vec<&Edge> = stages[s].deps.iter().collect();
    deps.sort_by_key(|e| e.stage);
    deps.dedup_by_key(|e| e.stage);
    for e in deps {
        match state[e.stage] {
            0 => visit(e.stage, stages, state, order, path)?,
            1 => {
                let start = path.iter().position(|&p| p == e.stage).unwrap_or(0);
                let mut names: Vec<String> =
                    path[start..].iter().map(|&p| stages[p].label()).collect();
                names.push(stages[e.stage].label());
                return Err((e.line, names.join(" -> ")));
            }
            _ => {}
        }
    }
    path.pop();
    state[s] = 2;
    order.push(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::parse_instructions;

    fn graph(
        text: &str,
        target: Option<&str>,
        args: &[(&str, &str)],
    ) -> Result<BuildGraph, PlanError> {
        let (doc, ins) = parse_instructions("Buildfile", text)?;
        let opts = PlanOptions {
            target: target.map(str::to_string),
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..PlanOptions::default()
        };
        lower("Buildfile", text, doc.escape, &ins, &opts)
    }

    const MULTI: &str = "FROM scratch AS a\nCOPY x /x\nFROM scratch AS b\nCOPY y /y\nFROM a AS c\nCOPY --from=b /y /y\nFROM scratch AS unused\n";

    #[test]
    fn prunes_and_levels() {
        let g = graph(MULTI, Some("c"), &[]).unwrap();
        assert_eq!(g.order, vec![0, 1, 2]);
        assert_eq!(g.levels, vec![vec![0, 1], vec![2]]);
        assert_eq!(g.stages[2].base, Base::Stage(0));
    }

    #[test]
    fn global_args_reach_from_only() {
        let g = graph(
            "ARG V=3.19\nFROM alpine:${V}\nRUN echo $V\n",
            None,
            &[("V", "3.20")],
        )
        .unwrap();
        assert_eq!(g.stages[0].base, Base::Image("alpine:3.20".into()));
        assert!(g.unused_build_args.is_empty());
    }

    #[test]
    fn warns_about_unconsumed_build_args() {
        let g = graph(
            "FROM scratch\n",
            None,
            &[("NOPE", "1"), ("HTTP_PROXY", "x")],
        )
        .unwrap();
        assert_eq!(g.unused_build_args, vec!["NOPE".to_string()]);
    }

    #[test]
    fn errors_point_at_lines() {
        let e = graph("FROM scratch AS a\nFROM scratch AS A\n", None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Buildfile:2:1: duplicate stage name \"a\""),
            "{e}"
        );
        let e = graph(
            "FROM scratch AS a\nCOPY --from=b / /\nFROM scratch AS b\nCOPY --from=a / /\n",
            None,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("circular dependency"), "{e}");
        assert!(matches!(
            graph(MULTI, Some("nope"), &[]),
            Err(PlanError::UnknownTarget(..))
        ));
        let e = graph("RUN x\nFROM scratch\n", None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Buildfile:1:1: no build stage"), "{e}");
    }

    #[test]
    fn copy_from_unknown_name_is_an_image() {
        let g = graph(
            "FROM scratch\nCOPY --from=busybox:latest /bin/sh /sh\n",
            None,
            &[],
        )
        .unwrap();
        assert_eq!(g.stages[0].image_refs, vec!["busybox:latest".to_string()]);
    }
}
