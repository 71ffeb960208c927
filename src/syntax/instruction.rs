//! Typed instructions: each [`Node`] checked against the Dockerfile reference (argument counts,
//! allowed flags, forms) and turned into an [`Instruction`]. Values stay unexpanded here:
//! expansion needs the build's variables, which the planner owns.

use super::error::{nearest, Span, SyntaxError};
use super::parser::{Document, Heredoc, Node};

/// Every instruction keyword, for "did you mean".
pub const KEYWORDS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A command in exec form (argv) or shell form (one string for the shell).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Command {
    Exec(Vec<String>),
    Shell(String),
}

/// `RUN --network=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Network {
    Default,
    None,
    Host,
}

/// `RUN [flags] command`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Run {
    pub command: Command,
    /// Raw `--mount` specs (expanded and parsed by the planner with [`super::mount::Mount`]).
    pub mounts: Vec<String>,
    pub network: Option<Network>,
    pub security: Option<String>,
    pub heredocs: Vec<Heredoc>,
}

/// `COPY`/`ADD` with their flags.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Copy {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub excludes: Vec<String>,
    pub checksum: Option<String>,
    pub keep_git_dir: bool,
    pub unpack: Option<bool>,
    pub heredocs: Vec<Heredoc>,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Healthcheck {
    None,
    Check {
        test: Command,
        interval: Option<u64>,
        timeout: Option<u64>,
        start_period: Option<u64>,
        start_interval: Option<u64>,
        retries: Option<u64>,
    },
}

/// One instruction. Strings are as written (unexpanded; ENV/LABEL/ARG keep their quotes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Instruction {
    From {
        image: String,
        alias: Option<String>,
        platform: Option<String>,
    },
    Run(Run),
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Arg(Vec<(String, Option<String>)>),
    Copy(Copy),
    Add(Copy),
    Expose(Vec<String>),
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    Stopsignal(String),
    Maintainer(String),
    /// The trigger's text, checked to parse, run when a child image builds FROM this one.
    Onbuild(String),
    Healthcheck(Healthcheck),
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Located {
    pub instruction: Instruction,
    pub span: Span,
    /// The logical line as written, for history and messages.
    pub text: String,
}

struct Ctx<'a> {
    file: &'a str,
    source: &'a str,
}

impl Ctx<'_> {
    /// An error at `node`, with the column of `needle` on its first line when it is there.
    fn err(&self, node: &Node, needle: Option<&str>, msg: impl Into<String>) -> SyntaxError {
        let line = self
            .source
            .lines()
            .nth(node.span.line.saturating_sub(1))
            .unwrap_or("");
        let column = needle
            .and_then(|n| line.find(n))
            .map(|b| line[..b].chars().count() + 1)
            .unwrap_or(node.span.column);
        SyntaxError::at(self.file, self.source, node.span.line, column, msg)
    }
}

/// Parsed `--name[=value]` flags of one instruction.
struct Flags {
    items: Vec<(String, Option<String>)>,
}

impl Flags {
    fn parse(ctx: &Ctx, node: &Node, allowed: &[&str]) -> Result<Flags, SyntaxError> {
        let mut items = Vec::new();
        for raw in &node.flags {
            let body = raw.trim_start_matches('-');
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if !allowed.contains(&name.as_str()) {
                let mut msg = format!(
                    "unknown flag --{} for {}",
                    name,
                    node.keyword.to_uppercase()
                );
                if let Some(s) = nearest(&name, allowed) {
                    msg.push_str(&format!("; did you mean --{}?", s.to_lowercase()));
                }
                return Err(ctx.err(node, Some(raw), msg));
            }
            items.push((name, value));
        }
        Ok(Flags { items })
    }
    fn value(&self, ctx: &Ctx, node: &Node, name: &str) -> Result<Option<String>, SyntaxError> {
        let mut found = None;
        for (n, v) in &self.items {
            if n == name {
                if found.is_some() {
                    return Err(ctx.err(
                        node,
                        Some(&format!("--{}", name)),
                        format!("duplicate flag --{}", name),
                    ));
                }
                match v {
                    Some(v) => found = Some(v.clone()),
                    None => {
                        return Err(ctx.err(
                            node,
                            Some(&format!("--{}", name)),
                            format!("missing a value on flag --{}", name),
                        ))
                    }
                }
            }
        }
        Ok(found)
    }
    fn all(&self, name: &str) -> Vec<String> {
        self.items
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.clone())
            .collect()
    }
    fn boolean(&self, ctx: &Ctx, node: &Node, name: &str) -> Result<Option<bool>, SyntaxError> {
        let mut out = None;
        for (n, v) in &self.items {
            if n == name {
                out = Some(match v.as_deref() {
                    None | Some("true") | Some("") => true,
                    Some("false") => false,
                    Some(other) => {
                        return Err(ctx.err(
                            node,
                            Some(&format!("--{}", name)),
                            format!(
                                "expecting boolean value for flag --{}, not: {}",
                                name, other
                            ),
                        ))
                    }
                });
            }
        }
        Ok(out)
    }
}

/// Parse a Go duration (`30s`, `1m30s`, `500ms`, `2h`) into nanoseconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    Some(total as u64)
}

fn command_of(node: &Node) -> Command {
    if node.json {
        Command::Exec(node.args.clone())
    } else {
        Command::Shell(node.args.first().cloned().unwrap_or_default())
    }
}

fn triples(args: &[String]) -> Vec<(String, String)> {
    args.chunks(3)
        .filter(|c| c.len() >= 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

/// Check and type one node.
fn instruction_of(ctx: &Ctx, node: &Node) -> Result<Instruction, SyntaxError> {
    let kw = node.keyword.as_str();
    let upper = kw.to_uppercase();
    let need = |ok: bool, msg: &str| {
        if ok {
            Ok(())
        } else {
            Err(ctx.err(node, None, msg.to_string()))
        }
    };
    let no_flags = |n: &Node| Flags::parse(ctx, n, &[]).map(|_| ());
    let single = |what: &str| -> Result<String, SyntaxError> {
        no_flags(node)?;
        match node.args.first() {
            Some(a) if !a.is_empty() => Ok(a.clone()),
            _ => Err(ctx.err(
                node,
                None,
                format!("{} requires exactly one argument", what),
            )),
        }
    };
    Ok(match kw {
        "from" => {
            let flags = Flags::parse(ctx, node, &["platform"])?;
            let platform = flags.value(ctx, node, "platform")?;
            let a = &node.args;
            match a.len() {
                1 => Instruction::From {
                    image: a[0].clone(),
                    alias: None,
                    platform,
                },
                3 if a[1].eq_ignore_ascii_case("as") => {
                    let name = a[2].to_lowercase();
                    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
                        && name.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c)
                        });
                    if !valid {
                        return Err(ctx.err(node, Some(&a[2]), format!("invalid stage name {:?}: it must start with a letter and hold only letters, digits, '-', '_' and '.'", a[2])));
                    }
                    Instruction::From {
                        image: a[0].clone(),
                        alias: Some(name),
                        platform,
                    }
                }
                3 => {
                    return Err(ctx.err(
                        node,
                        Some(&a[1]),
                        format!("expected AS, found {:?}", a[1]),
                    ))
                }
                _ => {
                    return Err(ctx.err(
                        node,
                        None,
                        "FROM requires either one or three arguments (FROM image [AS name])",
                    ))
                }
            }
        }
        "run" => {
            let flags = Flags::parse(ctx, node, &["mount", "network", "security"])?;
            need(
                !node.args.is_empty() || !node.heredocs.is_empty(),
                "RUN requires at least one argument",
            )?;
            let mounts = flags.all("mount");
            for m in &mounts {
                super::mount::Mount::parse(m).map_err(|e| ctx.err(node, Some("--mount"), e))?;
            }
            let network = match flags.value(ctx, node, "network")?.as_deref() {
                None => None,
                Some("default") => Some(Network::Default),
                Some("none") => Some(Network::None),
                Some("host") => Some(Network::Host),
                Some(other) => {
                    return Err(ctx.err(
                        node,
                        Some("--network"),
                        format!(
                            "unsupported network mode {:?} (default, none or host)",
                            other
                        ),
                    ))
                }
            };
            let security = flags.value(ctx, node, "security")?;
            if let Some(s) = &security {
                if s != "sandbox" && s != "insecure" {
                    return Err(ctx.err(
                        node,
                        Some("--security"),
                        format!("unsupported security mode {:?} (sandbox or insecure)", s),
                    ));
                }
            }
            Instruction::Run(Run {
                command: command_of(node),
                mounts,
                network,
                security,
                heredocs: node.heredocs.clone(),
            })
        }
        "cmd" => {
            no_flags(node)?;
            Instruction::Cmd(command_of(node))
        }
        "entrypoint" => {
            no_flags(node)?;
            Instruction::Entrypoint(command_of(node))
        }
        "shell" => {
            no_flags(node)?;
            need(
                node.json,
                "SHELL requires the arguments to be in JSON form, like SHELL [\"/bin/sh\", \"-c\"]",
            )?;
            need(
                !node.args.is_empty(),
                "SHELL requires at least one argument",
            )?;
            Instruction::Shell(node.args.clone())
        }
        "env" | "label" => {
            no_flags(node)?;
            need(
                !node.args.is_empty(),
                &format!("{} requires at least one argument", upper),
            )?;
            let kv = triples(&node.args);
            if let Some((k, _)) = kv.iter().find(|(k, _)| k.is_empty()) {
                return Err(ctx.err(node, Some(k), format!("{} names must not be empty", upper)));
            }
            if kw == "env" {
                Instruction::Env(kv)
            } else {
                Instruction::Label(kv)
            }
        }
        "arg" => {
            no_flags(node)?;
            need(!node.args.is_empty(), "ARG requires at least one argument")?;
            let mut out = Vec::new();
            for w in &node.args {
                let (name, default) = match w.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (w.clone(), None),
                };
                if name.is_empty() {
                    return Err(ctx.err(node, Some(w), "ARG names must not be empty"));
                }
                out.push((name, default));
            }
            Instruction::Arg(out)
        }
        "copy" | "add" => {
            let allowed: &[&str] = if kw == "copy" {
                &["from", "chown", "chmod", "link", "parents", "exclude"]
            } else {
                &[
                    "chown",
                    "chmod",
                    "link",
                    "exclude",
                    "checksum",
                    "keep-git-dir",
                    "unpack",
                ]
            };
            let flags = Flags::parse(ctx, node, allowed)?;
            let mut args = node.args.clone();
            let heredoc_source = args.len() == 1 && !node.heredocs.is_empty();
            if args.len() < 2 && !heredoc_source {
                return Err(ctx.err(
                    node,
                    None,
                    format!("{} requires at least two arguments, but only {} provided: the destination could not be determined", upper, args.len()),
                ));
            }
            let dest = args.pop().unwrap_or_default();
            let c = Copy {
                sources: args,
                dest,
                from: flags.value(ctx, node, "from")?,
                chown: flags.value(ctx, node, "chown")?,
                chmod: flags.value(ctx, node, "chmod")?,
                link: flags.boolean(ctx, node, "link")?.unwrap_or(false),
                parents: flags.boolean(ctx, node, "parents")?.unwrap_or(false),
                excludes: flags.all("exclude"),
                checksum: flags.value(ctx, node, "checksum")?,
                keep_git_dir: flags.boolean(ctx, node, "keep-git-dir")?.unwrap_or(false),
                unpack: flags.boolean(ctx, node, "unpack")?,
                heredocs: node.heredocs.clone(),
            };
            if kw == "copy" {
                Instruction::Copy(c)
            } else {
                Instruction::Add(c)
            }
        }
        "expose" => {
            no_flags(node)?;
            need(
                !node.args.is_empty(),
                "EXPOSE requires at least one argument",
            )?;
            Instruction::Expose(node.args.clone())
        }
        "volume" => {
            no_flags(node)?;
            need(
                !node.args.is_empty(),
                "VOLUME requires at least one argument",
            )?;
            need(
                node.args.iter().all(|a| !a.trim().is_empty()),
                "VOLUME specified can not be an empty string",
            )?;
            Instruction::Volume(node.args.clone())
        }
        "user" => Instruction::User(single("USER")?),
        "workdir" => Instruction::Workdir(single("WORKDIR")?),
        "stopsignal" => Instruction::Stopsignal(single("STOPSIGNAL")?),
        "maintainer" => Instruction::Maintainer(single("MAINTAINER")?),
        "onbuild" => {
            no_flags(node)?;
            let Some(inner) = &node.onbuild else {
                return Err(ctx.err(node, None, "ONBUILD requires at least one argument"));
            };
            match inner.keyword.as_str() {
                "onbuild" => {
                    return Err(ctx.err(
                        node,
                        None,
                        "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                    ))
                }
                "from" | "maintainer" => {
                    return Err(ctx.err(
                        node,
                        None,
                        format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            inner.keyword.to_uppercase()
                        ),
                    ))
                }
                _ => {}
            }
            instruction_of(ctx, inner)?;
            Instruction::Onbuild(node.rest.clone())
        }
        "healthcheck" => {
            let flags = Flags::parse(
                ctx,
                node,
                &[
                    "interval",
                    "timeout",
                    "start-period",
                    "start-interval",
                    "retries",
                ],
            )?;
            let ty = node
                .args
                .first()
                .map(|s| s.to_uppercase())
                .unwrap_or_default();
            match ty.as_str() {
                "NONE" => {
                    need(node.args.len() == 1, "HEALTHCHECK NONE takes no arguments")?;
                    need(node.flags.is_empty(), "HEALTHCHECK NONE takes no options")?;
                    Instruction::Healthcheck(Healthcheck::None)
                }
                "CMD" => {
                    need(node.args.len() >= 2, "HEALTHCHECK CMD requires a command")?;
                    let dur = |name: &str| -> Result<Option<u64>, SyntaxError> {
                        match flags.value(ctx, node, name)? {
                            None => Ok(None),
                            Some(v) => match parse_duration(&v) {
                                Some(d) if d == 0 || d >= 1_000_000 => Ok(Some(d)),
                                Some(_) => Err(ctx.err(
                                    node,
                                    Some(&format!("--{}", name)),
                                    format!("--{} cannot be less than 1ms", name),
                                )),
                                None => Err(ctx.err(
                                    node,
                                    Some(&format!("--{}", name)),
                                    format!("invalid duration {:?} for --{}", v, name),
                                )),
                            },
                        }
                    };
                    let retries = match flags.value(ctx, node, "retries")? {
                        None => None,
                        Some(v) => Some(v.parse::<u64>().map_err(|_| {
                            ctx.err(
                                node,
                                Some("--retries"),
                                format!("invalid --retries value {:?}", v),
                            )
                        })?),
                    };
                    let test = if node.json {
                        Command::Exec(node.args[1..].to_vec())
                    } else {
                        Command::Shell(node.args[1].clone())
                    };
                    Instruction::Healthcheck(Healthcheck::Check {
                        test,
                        interval: dur("interval")?,
                        timeout: dur("timeout")?,
                        start_period: dur("start-period")?,
                        start_interval: dur("start-interval")?,
                        retries,
                    })
                }
                _ => {
                    return Err(ctx.err(
                        node,
                        None,
                        format!(
                            "unknown type {:?} for HEALTHCHECK (CMD or NONE)",
                            node.args.first().cloned().unwrap_or_default()
                        ),
                    ))
                }
            }
        }
        _ => {
            let mut msg = format!("unknown instruction {}", node.word);
            if let Some(s) = nearest(&node.word, KEYWORDS) {
                msg.push_str(&format!("; did you mean {}?", s));
            }
            return Err(ctx.err(node, None, msg));
        }
    })
}

/// Type every instruction of a parsed document.
pub fn typed(file: &str, source: &str, doc: &Document) -> Result<Vec<Located>, SyntaxError> {
    let ctx = Ctx { file, source };
    doc.nodes
        .iter()
        .map(|n| {
            Ok(Located {
                instruction: instruction_of(&ctx, n)?,
                span: n.span,
                text: n.original.trim().to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::parser::parse;

    fn check(text: &str) -> Result<Vec<Located>, SyntaxError> {
        let doc = parse("Buildfile", text)?;
        typed("Buildfile", text, &doc)
    }

    #[test]
    fn typo_suggests_keyword_with_position() {
        let e = check("FROM scratch\n  RNU make\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Buildfile:2:3: unknown instruction RNU; did you mean RUN?\n    RNU make\n    ^"
        );
    }

    #[test]
    fn unknown_flag_points_at_flag() {
        let e = check("FROM scratch\nCOPY --form=a x y\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 6));
        assert!(e.message.contains("did you mean --from?"), "{}", e.message);
    }

    #[test]
    fn from_forms() {
        assert!(check("FROM a AS b c\n").is_err());
        assert!(check("FROM a IS b\n").is_err());
        let l = check("FROM --platform=linux/arm64 a As Build\n").unwrap();
        assert_eq!(
            l[0].instruction,
            Instruction::From {
                image: "a".into(),
                alias: Some("build".into()),
                platform: Some("linux/arm64".into())
            }
        );
    }

    #[test]
    fn copy_needs_destination_unless_heredoc() {
        assert!(check("FROM a\nCOPY x\n").is_err());
        assert!(check("FROM a\nCOPY <<EOF /x\nhi\nEOF\n").is_ok());
    }

    #[test]
    fn healthcheck_and_durations() {
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert!(parse_duration("5x").is_none());
        assert!(check("FROM a\nHEALTHCHECK --interval=5x CMD true\n").is_err());
        assert!(check("FROM a\nHEALTHCHECK NONE\n").is_ok());
        assert!(check("FROM a\nHEALTHCHECK WAT\n").is_err());
    }

    #[test]
    fn onbuild_rules() {
        assert!(check("FROM a\nONBUILD ONBUILD RUN x\n").is_err());
        assert!(check("FROM a\nONBUILD FROM b\n").is_err());
        let l = check("FROM a\nONBUILD RUN echo hi\n").unwrap();
        assert_eq!(l[1].instruction, Instruction::Onbuild("RUN echo hi".into()));
    }

    #[test]
    fn shell_needs_json() {
        assert!(check("FROM a\nSHELL /bin/bash -c\n").is_err());
        assert!(check("FROM a\nSHELL [\"/bin/bash\", \"-c\"]\n").is_ok());
    }
}
