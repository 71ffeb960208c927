//! Build checks: BuildKit's lint rules, evaluated on the parsed build file before anything
//! runs. Each finding names its rule, where it is (line and column) and what to change.
//! The `# check=skip=<rules|all>;error=<bool>` directive turns rules off, or makes any finding
//! fail the build.

use std::collections::{BTreeMap, BTreeSet};

use crate::syntax::dockerignore::IgnoreMatcher;
use crate::syntax::expand::{LexOptions, Lexer};
use crate::syntax::{Document, Instruction, Located, Node};

/// Every rule, in BuildKit's names.
pub const RULES: &[&str] = &[
    "StageNameCasing",
    "FromAsCasing",
    "NoEmptyContinuation",
    "ConsistentInstructionCasing",
    "DuplicateStageName",
    "ReservedStageName",
    "JSONArgsRecommended",
    "MaintainerDeprecated",
    "UndefinedArgInFrom",
    "WorkdirRelativePath",
    "UndefinedVar",
    "MultipleInstructionsDisallowed",
    "LegacyKeyValueFormat",
    "InvalidBaseImagePlatform",
    "RedundantTargetPlatform",
    "SecretsUsedInArgOrEnv",
    "InvalidDefaultArgInFrom",
    "FromPlatformFlagConstDisallowed",
    "CopyIgnoredFile",
    "ExposeProtoCasing",
    "ExposeInvalidFormat",
];

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Finding {
    /// `Buildfile:3:1: StageNameCasing: Stage name 'Builder' should be lowercase`.
    pub fn line_in(&self, file: &str) -> String {
        format!(
            "{}:{}:{}: {}: {}",
            file, self.line, self.column, self.rule, self.message
        )
    }
}

/// What `# check=` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckPolicy {
    pub skip_all: bool,
    pub skip: BTreeSet<String>,
    /// Any finding fails the build.
    pub error: bool,
}

impl CheckPolicy {
    /// Parse the directive's value, `skip=A,B;error=true`.
    pub fn parse(value: Option<&str>) -> Result<CheckPolicy, String> {
        let mut p = CheckPolicy::default();
        let Some(value) = value else {
            return Ok(p);
        };
        for part in value.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("check directive: {:?} is not key=value", part))?;
            match k.trim() {
                "skip" => {
                    for rule in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        if rule == "all" {
                            p.skip_all = true;
                        } else {
                            p.skip.insert(rule.to_string());
                        }
                    }
                }
                "error" => {
                    p.error = match v.trim() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(format!(
                                "check directive: error={:?}: want true or false",
                                other
                            ))
                        }
                    }
                }
                other => return Err(format!("check directive: unknown key {:?}", other)),
            }
        }
        Ok(p)
    }

    fn enabled(&self, rule: &str) -> bool {
        !self.skip_all && !self.skip.contains(rule)
    }
}

/// What the checks know of a base image, when the store has it.
pub trait BaseImages {
    /// The image's environment, or `None` when it is not known here.
    fn env(&self, image: &str) -> Option<Vec<(String, String)>>;
    /// The image's `os/arch[/variant]`, when known.
    fn platform(&self, image: &str) -> Option<String>;
}

/// No base image is known: rules that need one say nothing.
pub struct NoBaseImages;

impl BaseImages for NoBaseImages {
    fn env(&self, _: &str) -> Option<Vec<(String, String)>> {
        None
    }
    fn platform(&self, _: &str) -> Option<String> {
        None
    }
}

/// Everything a check run reads.
pub struct CheckInput<'a> {
    pub source: &'a str,
    pub doc: &'a Document,
    pub typed: &'a [Located],
    pub ignore: &'a IgnoreMatcher,
    pub build_args: &'a BTreeMap<String, String>,
    /// The platform the build targets, `os/arch[/variant]`.
    pub target_platform: &'a str,
    pub platform_args: &'a BTreeMap<String, String>,
    pub bases: &'a dyn BaseImages,
}

/// Names a `$VAR` in `text` refers to that `known` does not define, in order.
fn undefined_in(text: &str, escape: char, known: &dyn Fn(&str) -> bool) -> Vec<String> {
    let missing = std::cell::RefCell::new(Vec::<String>::new());
    let lookup = |name: &str| -> Option<String> {
        if known(name) {
            Some(String::new())
        } else {
            let mut m = missing.borrow_mut();
            if !m.iter().any(|x| x == name) {
                m.push(name.to_string());
            }
            None
        }
    };
    let _ = Lexer::new(escape, LexOptions::default()).words(text, &lookup);
    missing.into_inner()
}

fn secret_like(name: &str) -> bool {
    const TOKENS: &[&str] = &[
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pass",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    let lower = name.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('_').collect();
    !parts.contains(&"public") && parts.iter().any(|p| TOKENS.contains(p))
}

/// Run every enabled rule; findings in file order.
pub fn run(input: &CheckInput, policy: &CheckPolicy) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut add = |rule: &'static str, line: usize, column: usize, message: String| {
        if policy.enabled(rule) {
            out.push(Finding {
                rule,
                line,
                column,
                message,
            });
        }
    };
    let escape = input.doc.escape;
    let nodes = &input.doc.nodes;

    // ConsistentInstructionCasing: the majority casing of the keywords.
    let (mut upper, mut lower) = (0, 0);
    for n in nodes {
        if n.word == n.word.to_uppercase() {
            upper += 1;
        } else if n.word == n.word.to_lowercase() {
            lower += 1;
        }
    }
    let majority_upper = upper >= lower;
    for n in nodes {
        let wrong = if majority_upper {
            n.word != n.word.to_uppercase()
        } else {
            n.word != n.word.to_lowercase()
        };
        if wrong {
            add(
                "ConsistentInstructionCasing",
                n.span.line,
                n.span.column,
                format!(
                    "Command '{}' should match the case of the command majority ({})",
                    n.word,
                    if majority_upper {
                        "uppercase"
                    } else {
                        "lowercase"
                    }
                ),
            );
        }
    }

    // NoEmptyContinuation: a blank line inside a continued instruction (not a heredoc body).
    let lines: Vec<&str> = input.source.lines().collect();
    for n in nodes.iter().filter(|n| n.heredocs.is_empty()) {
        for l in n.span.line + 1..=n.span.end_line {
            if lines.get(l - 1).is_some_and(|t| t.trim().is_empty()) {
                add(
                    "NoEmptyContinuation",
                    l,
                    1,
                    "Empty continuation line found in a command: empty continuation lines \
                     will become errors in a future release"
                        .into(),
                );
                break;
            }
        }
    }

    // Global ARGs (before the first FROM).
    let mut global: BTreeMap<String, Option<String>> = BTreeMap::new();
    for l in input.typed {
        match &l.instruction {
            Instruction::From { .. } => break,
            Instruction::Arg(decls) => {
                for (k, v) in decls {
                    global.insert(k.clone(), v.clone());
                }
            }
            _ => {}
        }
    }
    let global_known = |n: &str| global.contains_key(n) || input.platform_args.contains_key(n);

    // Per stage.
    let mut stage_names: BTreeMap<String, usize> = BTreeMap::new();
    let mut i = 0;
    let typed = input.typed;
    // Each typed instruction's parse node, by position: one lookup each, whatever the size.
    let by_position: std::collections::HashMap<(usize, usize), &Node> = nodes
        .iter()
        .map(|n| ((n.span.line, n.span.column), n))
        .collect();
    let node_of =
        |l: &Located| -> Option<&Node> { by_position.get(&(l.span.line, l.span.column)).copied() };
    while i < typed.len() {
        let Instruction::From {
            image,
            alias,
            platform,
        } = &typed[i].instruction
        else {
            // SecretsUsedInArgOrEnv applies to global ARGs too.
            if let Instruction::Arg(decls) = &typed[i].instruction {
                for (k, _) in decls {
                    if secret_like(k) {
                        add(
                            "SecretsUsedInArgOrEnv",
                            typed[i].span.line,
                            typed[i].span.column,
                            format!("Do not use ARG or ENV instructions for sensitive data (ARG \"{}\")", k),
                        );
                    }
                }
            }
            i += 1;
            continue;
        };
        let from = &typed[i];
        let from_node = node_of(from);
        let (line, col) = (from.span.line, from.span.column);

        // Stage name rules.
        if let Some(n) = from_node {
            if n.args.len() == 3 {
                let written = &n.args[2];
                if written.chars().any(|c| c.is_uppercase()) {
                    add(
                        "StageNameCasing",
                        line,
                        col,
                        format!("Stage name '{}' should be lowercase", written),
                    );
                }
                let as_kw = &n.args[1];
                let from_upper = n.word == n.word.to_uppercase();
                let as_upper = as_kw == &as_kw.to_uppercase();
                if from_upper != as_upper {
                    add(
                        "FromAsCasing",
                        line,
                        col,
                        format!("'{}' and '{}' keywords' casing do not match", as_kw, n.word),
                    );
                }
            }
        }
        if let Some(name) = alias {
            if name == "scratch" || name == "context" {
                add(
                    "ReservedStageName",
                    line,
                    col,
                    format!(
                        "'{}' is reserved and should not be used as a stage name",
                        name
                    ),
                );
            }
            if let Some(first) = stage_names.get(name) {
                add(
                    "DuplicateStageName",
                    line,
                    col,
                    format!(
                        "Duplicate stage name '{}', stage names should be unique (first on line {})",
                        name, first
                    ),
                );
            } else {
                stage_names.insert(name.clone(), line);
            }
        }

        // FROM and its ARGs.
        let undefined = undefined_in(image, escape, &global_known);
        for v in &undefined {
            add(
                "UndefinedArgInFrom",
                line,
                col,
                format!("FROM argument '{}' is not declared", v),
            );
        }
        if undefined.is_empty() && image.contains('$') {
            // Evaluated with the defaults alone (no --build-arg), the name must still be one.
            let defaults = |n: &str| -> Option<String> {
                global
                    .get(n)
                    .cloned()
                    .flatten()
                    .or_else(|| input.platform_args.get(n).cloned())
            };
            let value = Lexer::new(escape, LexOptions::default())
                .word(image, &defaults)
                .unwrap_or_default();
            let valid = !value.is_empty()
                && !value.starts_with(':')
                && !value.ends_with(':')
                && !value.contains("::")
                && !value.contains(char::is_whitespace);
            if !valid {
                let args: Vec<String> = global
                    .keys()
                    .filter(|k| image.contains(k.as_str()))
                    .cloned()
                    .collect();
                add(
                    "InvalidDefaultArgInFrom",
                    line,
                    col,
                    format!(
                        "Default value for ARG {} results in empty or invalid base image name",
                        if args.is_empty() {
                            image.clone()
                        } else {
                            args.join(", ")
                        }
                    ),
                );
            }
        }
        if let Some(p) = platform {
            if p.trim() == "$TARGETPLATFORM" || p.trim() == "${TARGETPLATFORM}" {
                add(
                    "RedundantTargetPlatform",
                    line,
                    col,
                    format!(
                        "Setting platform to predefined {} in FROM is redundant as this is the default behavior",
                        p.trim()
                    ),
                );
            } else if !p.contains('$') {
                add(
                    "FromPlatformFlagConstDisallowed",
                    line,
                    col,
                    format!(
                        "FROM --platform flag should not use constant value \"{}\"",
                        p
                    ),
                );
            }
        }

        // The stage's base: an earlier stage, or an image.
        let base_lower = image.to_lowercase();
        let base_stage =
            stage_names.contains_key(&base_lower) && alias.as_deref() != Some(&base_lower);
        let resolved_image = Lexer::new(escape, LexOptions::default())
            .word(image, &|n: &str| {
                input
                    .build_args
                    .get(n)
                    .cloned()
                    .or_else(|| global.get(n).cloned().flatten())
                    .or_else(|| input.platform_args.get(n).cloned())
            })
            .unwrap_or_default();
        let mut env_known: Option<BTreeSet<String>> = if base_stage || image == "scratch" {
            // Stage bases: their ENV is not tracked here; scratch has PATH only.
            (image == "scratch").then(|| ["PATH".to_string()].into_iter().collect())
        } else {
            input
                .bases
                .env(&resolved_image)
                .map(|e| e.into_iter().map(|(k, _)| k).collect())
        };
        if !base_stage && image != "scratch" && platform.is_none() {
            if let Some(p) = input.bases.platform(&resolved_image) {
                if p != input.target_platform {
                    add(
                        "InvalidBaseImagePlatform",
                        line,
                        col,
                        format!(
                            "Base image {} was pulled with platform \"{}\", expected \"{}\" for current build",
                            resolved_image, p, input.target_platform
                        ),
                    );
                }
            }
        }

        // The stage's instructions.
        let mut declared: BTreeSet<String> = BTreeSet::new();
        let mut counts: BTreeMap<&'static str, Vec<(usize, usize)>> = BTreeMap::new();
        let mut shell_set = false;
        let mut workdir_absolute = false;
        i += 1;
        while i < typed.len() && !matches!(typed[i].instruction, Instruction::From { .. }) {
            let l = &typed[i];
            let node = node_of(l);
            let (line, col) = (l.span.line, l.span.column);
            let known = |n: &str| {
                declared.contains(n)
                    || super::scope::PROXY_ARGS.contains(&n)
                    || input.platform_args.contains_key(n)
                    || env_known.as_ref().is_none_or(|e| e.contains(n))
            };
            let check_vars =
                |texts: &[&str], add: &mut dyn FnMut(&'static str, usize, usize, String)| {
                    for t in texts {
                        for v in undefined_in(t, escape, &known) {
                            add(
                                "UndefinedVar",
                                line,
                                col,
                                format!("Usage of undefined variable '${}'", v),
                            );
                        }
                    }
                };
            match &l.instruction {
                Instruction::Maintainer(_) => add(
                    "MaintainerDeprecated",
                    line,
                    col,
                    "Maintainer instruction is deprecated in favor of using label".into(),
                ),
                Instruction::Cmd(c) | Instruction::Entrypoint(c) => {
                    let which = if matches!(l.instruction, Instruction::Cmd(_)) {
                        "CMD"
                    } else {
                        "ENTRYPOINT"
                    };
                    counts.entry(which).or_default().push((line, col));
                    if matches!(c, crate::syntax::instruction::Command::Shell(_)) && !shell_set {
                        add(
                            "JSONArgsRecommended",
                            line,
                            col,
                            format!("JSON arguments recommended for {} to prevent unintended behavior related to OS signals", which),
                        );
                    }
                }
                Instruction::Healthcheck(_) => {
                    counts.entry("HEALTHCHECK").or_default().push((line, col))
                }
                Instruction::Shell(_) => shell_set = true,
                Instruction::Workdir(w) => {
                    check_vars(&[w], &mut add);
                    if w.starts_with('/') || w.starts_with('$') {
                        workdir_absolute = true;
                    } else if !workdir_absolute {
                        add(
                            "WorkdirRelativePath",
                            line,
                            col,
                            format!("Relative workdir \"{}\" can have unexpected results if the base image changes", w),
                        );
                    }
                }
                Instruction::Env(kvs) | Instruction::Label(kvs) => {
                    let is_env = matches!(l.instruction, Instruction::Env(_));
                    let legacy = node.is_some_and(|n| {
                        n.args.len() == 3 && n.args.get(2).is_some_and(|s| s.is_empty())
                    });
                    if legacy {
                        add(
                            "LegacyKeyValueFormat",
                            line,
                            col,
                            format!(
                                "\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format",
                                kw = if is_env { "ENV" } else { "LABEL" }
                            ),
                        );
                    }
                    for (k, v) in kvs {
                        check_vars(&[k, v], &mut add);
                    }
                    if is_env {
                        for (k, _) in kvs {
                            if secret_like(k) {
                                add(
                                    "SecretsUsedInArgOrEnv",
                                    line,
                                    col,
                                    format!("Do not use ARG or ENV instructions for sensitive data (ENV \"{}\")", k),
                                );
                            }
                        }
                        if let Some(e) = env_known.as_mut() {
                            e.extend(kvs.iter().map(|(k, _)| k.clone()));
                        }
                        // An ENV whose key is itself expanded is not tracked; treat it known.
                        declared.extend(kvs.iter().map(|(k, _)| k.clone()));
                    }
                }
                Instruction::Arg(decls) => {
                    for (k, v) in decls {
                        if let Some(v) = v {
                            check_vars(&[v], &mut add);
                        }
                        if secret_like(k) {
                            add(
                                "SecretsUsedInArgOrEnv",
                                line,
                                col,
                                format!("Do not use ARG or ENV instructions for sensitive data (ARG \"{}\")", k),
                            );
                        }
                    }
                    declared.extend(decls.iter().map(|(k, _)| k.clone()));
                }
                Instruction::Expose(ports) => {
                    check_vars(
                        &ports.iter().map(String::as_str).collect::<Vec<_>>(),
                        &mut add,
                    );
                    for p in ports {
                        if p.contains('$') {
                            continue;
                        }
                        if p.matches(':').count() >= 1 {
                            add(
                                "ExposeInvalidFormat",
                                line,
                                col,
                                format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{}'", p),
                            );
                        }
                        if let Some((_, proto)) = p.split_once('/') {
                            if proto != proto.to_lowercase() {
                                add(
                                    "ExposeProtoCasing",
                                    line,
                                    col,
                                    format!("Defined protocol '{}' in EXPOSE instruction should be lowercase", p),
                                );
                            }
                        }
                    }
                }
                Instruction::Copy(c) | Instruction::Add(c) => {
                    let mut texts: Vec<&str> = c.sources.iter().map(String::as_str).collect();
                    texts.push(&c.dest);
                    check_vars(&texts, &mut add);
                    if c.from.is_none() && !input.ignore.is_empty() {
                        for s in &c.sources {
                            if s.contains('$') || s.starts_with("<<") || s.contains("://") {
                                continue;
                            }
                            let rel = crate::syntax::dockerignore::clean_path(&format!("/{}", s));
                            let rel = rel.trim_start_matches('/');
                            if !rel.is_empty() && input.ignore.is_ignored(rel) {
                                add(
                                    "CopyIgnoredFile",
                                    line,
                                    col,
                                    format!(
                                        "Attempting to {} file \"{}\" that is excluded by .dockerignore",
                                        if matches!(l.instruction, Instruction::Add(_)) { "Add" } else { "Copy" },
                                        s
                                    ),
                                );
                            }
                        }
                    }
                }
                Instruction::User(u) | Instruction::Stopsignal(u) => check_vars(&[u], &mut add),
                Instruction::Volume(vs) => {
                    check_vars(&vs.iter().map(String::as_str).collect::<Vec<_>>(), &mut add)
                }
                _ => {}
            }
            i += 1;
        }
        for (which, at) in counts {
            if at.len() > 1 {
                for (line, col) in &at[..at.len() - 1] {
                    add(
                        "MultipleInstructionsDisallowed",
                        *line,
                        *col,
                        format!("Multiple {} instructions should not be used in the same stage because only the last one will be used", which),
                    );
                }
            }
        }
    }
    out.sort_by_key(|f| (f.line, f.column));
    out
}
