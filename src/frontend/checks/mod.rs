//! Build checks: BuildKit's lint rules, evaluated on the parsed build file before anything
//! runs. Each finding names its rule, where it is (line and column) and what to change.
//! The `# check=skip=<rules|all>;error=<bool>` directive turns rules off, or makes any finding
//! fail the build.
//!
//! Each rule is a file of this directory and a row of [`RULES`], as in BuildKit's
//! `linter/ruleset.go`. One walk over the file keeps what the rules share (global ARGs, the
//! stages so far, the variables each instruction can see) and calls every enabled rule at
//! the file, at each FROM, at each instruction and at each stage's end. A new rule is a file
//! here and a row in the table.

mod consistent_instruction_casing;
mod copy_ignored_file;
mod duplicate_stage_name;
mod expose_invalid_format;
mod expose_proto_casing;
mod from_as_casing;
mod from_platform_flag_const_disallowed;
mod invalid_base_image_platform;
mod invalid_default_arg_in_from;
mod invalid_definition_description;
mod json_args_recommended;
mod legacy_key_value_format;
mod maintainer_deprecated;
mod multiple_instructions_disallowed;
mod no_empty_continuation;
mod redundant_target_platform;
mod reserved_stage_name;
mod secrets_used_in_arg_or_env;
mod stage_name_casing;
mod undefined_arg_in_from;
mod undefined_var;
mod workdir_relative_path;

use std::collections::{BTreeMap, BTreeSet};

use crate::syntax::dockerignore::IgnoreMatcher;
use crate::syntax::expand::{LexOptions, Lexer};
use crate::syntax::{Document, Instruction, Located, Node};

/// A rule: its BuildKit name and what it asks for, and its hooks into the walk (each does
/// nothing unless the rule says otherwise).
pub(super) trait Rule {
    /// The whole file, before anything else.
    fn file(&mut self, _f: &FileCx, _out: &mut Out) {}
    /// A FROM.
    fn from(&mut self, _s: &FromCx, _out: &mut Out) {}
    /// An instruction: of a stage, or (`stage` is `None`) before the first FROM.
    fn instruction(&mut self, _stage: Option<&FromCx>, _i: &InstrCx, _out: &mut Out) {}
    /// The end of a stage.
    fn stage_end(&mut self, _out: &mut Out) {}
}

/// One row of the rule table.
pub struct RuleInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// Off unless `# check=experimental=<rule|all>` turns it on, as in BuildKit.
    pub experimental: bool,
    make: fn() -> Box<dyn Rule>,
}

macro_rules! rule {
    ($name:literal, $module:ident :: $ty:ident, $description:literal) => {
        rule!($name, $module::$ty, $description, false)
    };
    ($name:literal, $module:ident :: $ty:ident, $description:literal, $experimental:literal) => {
        RuleInfo {
            name: $name,
            description: $description,
            experimental: $experimental,
            make: || Box::new($module::$ty::default()),
        }
    };
}

/// Every rule, in BuildKit's names; at one place in the file, findings come in this order.
pub const RULES: &[RuleInfo] = &[
    rule!("ConsistentInstructionCasing", consistent_instruction_casing::ConsistentInstructionCasing, "All commands within the Dockerfile should use the same casing (either upper or lower)"),
    rule!("NoEmptyContinuation", no_empty_continuation::NoEmptyContinuation, "Empty continuation lines will become errors in a future release"),
    rule!("StageNameCasing", stage_name_casing::StageNameCasing, "Stage names should be lowercase"),
    rule!("FromAsCasing", from_as_casing::FromAsCasing, "The 'as' keyword should match the case of the 'from' keyword"),
    rule!("ReservedStageName", reserved_stage_name::ReservedStageName, "Reserved words should not be used as stage names"),
    rule!("DuplicateStageName", duplicate_stage_name::DuplicateStageName, "Stage names should be unique"),
    rule!("UndefinedArgInFrom", undefined_arg_in_from::UndefinedArgInFrom, "FROM command must use declared ARGs"),
    rule!("InvalidDefaultArgInFrom", invalid_default_arg_in_from::InvalidDefaultArgInFrom, "Default value for global ARG results in an empty or invalid base image name"),
    rule!("RedundantTargetPlatform", redundant_target_platform::RedundantTargetPlatform, "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior"),
    rule!("FromPlatformFlagConstDisallowed", from_platform_flag_const_disallowed::FromPlatformFlagConstDisallowed, "FROM --platform flag should not use a constant value"),
    rule!("InvalidBaseImagePlatform", invalid_base_image_platform::InvalidBaseImagePlatform, "Base image platform does not match expected target platform"),
    rule!("MaintainerDeprecated", maintainer_deprecated::MaintainerDeprecated, "The MAINTAINER instruction is deprecated, use a label instead to define an image author"),
    rule!("JSONArgsRecommended", json_args_recommended::JsonArgsRecommended, "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals"),
    rule!("LegacyKeyValueFormat", legacy_key_value_format::LegacyKeyValueFormat, "Legacy key/value format with whitespace separator should not be used"),
    rule!("UndefinedVar", undefined_var::UndefinedVar, "Variables should be defined before their use"),
    rule!("WorkdirRelativePath", workdir_relative_path::WorkdirRelativePath, "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes"),
    rule!("SecretsUsedInArgOrEnv", secrets_used_in_arg_or_env::SecretsUsedInArgOrEnv, "Sensitive data should not be used in the ARG or ENV commands"),
    rule!("ExposeInvalidFormat", expose_invalid_format::ExposeInvalidFormat, "IP address and host-port mapping should not be used in EXPOSE instruction"),
    rule!("ExposeProtoCasing", expose_proto_casing::ExposeProtoCasing, "Protocol in EXPOSE instruction should be lowercase"),
    rule!("CopyIgnoredFile", copy_ignored_file::CopyIgnoredFile, "Attempting to Copy file that is excluded by .dockerignore"),
    rule!("MultipleInstructionsDisallowed", multiple_instructions_disallowed::MultipleInstructionsDisallowed, "Multiple instructions of the same type should not be used in the same stage"),
    rule!("InvalidDefinitionDescription", invalid_definition_description::InvalidDefinitionDescription, "Comment for build stage or argument should follow the format: `# <arg/stage name> <description>`. If this is not intended to be a description comment, add an empty line or comment between the instruction and the comment.", true),
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

/// What `# check=` (or the `BUILDKIT_DOCKERFILE_CHECK` build arg) asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckPolicy {
    pub skip_all: bool,
    pub skip: BTreeSet<String>,
    /// Every experimental rule is on.
    pub experimental_all: bool,
    /// Experimental rules turned on by name.
    pub experimental: BTreeSet<String>,
    /// Any finding fails the build.
    pub error: bool,
}

impl CheckPolicy {
    /// Parse the directive's value, `skip=A,B;experimental=C;error=true`.
    pub fn parse(value: Option<&str>) -> Result<CheckPolicy, String> {
        let mut p = CheckPolicy::default();
        let Some(value) = value else {
            return Ok(p);
        };
        let names = |v: &str| -> (bool, Vec<String>) {
            match v.trim() {
                "all" => (true, Vec::new()),
                v => (
                    false,
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                ),
            }
        };
        for part in value.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("check directive: {:?} is not key=value", part))?;
            match k.trim() {
                "skip" => {
                    let (all, rules) = names(v);
                    p.skip_all |= all;
                    p.skip.extend(rules);
                }
                "experimental" => {
                    let (all, rules) = names(v);
                    p.experimental_all |= all;
                    p.experimental.extend(rules);
                }
                "error" => {
                    p.error = match v.trim() {
                        "true" | "1" | "t" | "T" | "TRUE" | "True" => true,
                        "false" | "0" | "f" | "F" | "FALSE" | "False" => false,
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

    /// The policy for one instruction: this one, plus what a `# check=` comment right above
    /// it skips or turns on (BuildKit v0.26+). Its `error=` has no effect there.
    pub fn for_comments(&self, comments: &[String]) -> CheckPolicy {
        let Some(value) = comments.iter().find_map(|c| {
            let (k, v) = c.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("check")).then(|| v.trim())
        }) else {
            return self.clone();
        };
        // A comment may go on after the value: `# check=skip=X // why`.
        let value = value.split(' ').next().unwrap_or("");
        let Ok(local) = CheckPolicy::parse(Some(value)) else {
            return self.clone();
        };
        let mut merged = self.clone();
        merged.skip_all |= local.skip_all;
        merged.skip.extend(local.skip);
        merged.experimental_all |= local.experimental_all;
        merged.experimental.extend(local.experimental);
        merged
    }

    fn enabled(&self, rule: &RuleInfo) -> bool {
        if rule.experimental {
            self.experimental_all || self.experimental.contains(rule.name)
        } else {
            !self.skip_all && !self.skip.contains(rule.name)
        }
    }
}

/// What the checks know of a base image, when it is readable without a network.
pub trait BaseImages {
    /// The image's environment, or `None` when it is not known here.
    fn env(&self, image: &str) -> Option<Vec<(String, String)>>;
    /// The `os/arch[/variant]` of the image the base gives for `wanted`, when known.
    fn platform(&self, image: &str, wanted: &str) -> Option<String>;
}

/// No base image is known: rules that need one say nothing.
pub struct NoBaseImages;

impl BaseImages for NoBaseImages {
    fn env(&self, _: &str) -> Option<Vec<(String, String)>> {
        None
    }
    fn platform(&self, _: &str, _: &str) -> Option<String> {
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

/// What a rule sees of the whole file.
pub(super) struct FileCx<'a> {
    pub input: &'a CheckInput<'a>,
    pub nodes: &'a [Node],
}

/// What a rule sees at a FROM, and through the stage that follows.
pub(super) struct FromCx<'a> {
    pub input: &'a CheckInput<'a>,
    pub escape: char,
    pub line: usize,
    pub column: usize,
    /// The FROM's parse node (its words as written).
    pub node: Option<&'a Node>,
    pub image: &'a str,
    pub alias: Option<&'a str>,
    pub platform: Option<&'a str>,
    /// The ARGs before the first FROM, with their defaults.
    pub global: &'a BTreeMap<String, Option<String>>,
    /// Whether a name is a global ARG or a platform arg.
    pub global_known: &'a dyn Fn(&str) -> bool,
    /// The line of an earlier stage of the same name.
    pub earlier: Option<usize>,
    /// Whether the base is an earlier stage.
    pub base_stage: bool,
    /// The base image's name with the build's args.
    pub resolved_image: &'a str,
}

/// What a rule sees at one instruction.
pub(super) struct InstrCx<'a> {
    pub located: &'a Located,
    pub node: Option<&'a Node>,
    pub line: usize,
    pub column: usize,
    pub escape: char,
    /// Whether a variable is defined here (declared, from the base's environment, or
    /// predefined).
    pub known: &'a dyn Fn(&str) -> bool,
    pub ignore: &'a IgnoreMatcher,
}

/// Where a rule's findings go.
pub(super) struct Out<'a> {
    rule: &'static str,
    findings: &'a mut Vec<Finding>,
}

impl Out<'_> {
    pub fn add(&mut self, line: usize, column: usize, message: String) {
        self.findings.push(Finding {
            rule: self.rule,
            line,
            column,
            message,
        });
    }
}

/// Names a `$VAR` in `text` refers to that `known` does not define, in order.
pub(super) fn undefined_in(text: &str, escape: char, known: &dyn Fn(&str) -> bool) -> Vec<String> {
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

pub(super) fn secret_like(name: &str) -> bool {
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

/// The enabled rules, each with its findings' destination.
struct Enabled {
    rules: Vec<(&'static str, Box<dyn Rule>)>,
    findings: Vec<Finding>,
}

impl Enabled {
    fn each(&mut self, mut f: impl FnMut(&mut dyn Rule, &mut Out)) {
        for (name, rule) in &mut self.rules {
            let mut out = Out {
                rule: name,
                findings: &mut self.findings,
            };
            f(rule.as_mut(), &mut out);
        }
    }
}

/// Run every enabled rule; findings in file order. A `# check=` comment above an
/// instruction changes the policy for the findings at that instruction only.
pub fn run(input: &CheckInput, policy: &CheckPolicy) -> Vec<Finding> {
    let policies: Vec<(usize, usize, CheckPolicy)> = input
        .doc
        .nodes
        .iter()
        .filter(|n| n.comments.iter().any(|c| c.contains('=')))
        .map(|n| {
            (
                n.span.line,
                n.span.end_line,
                policy.for_comments(&n.comments),
            )
        })
        .collect();
    let policy_at = |line: usize| -> &CheckPolicy {
        // The last instruction starting at or before `line` (they are in file order).
        let after = policies.partition_point(|(start, _, _)| *start <= line);
        match after.checked_sub(1).map(|i| &policies[i]) {
            Some((_, end, p)) if line <= *end => p,
            _ => policy,
        }
    };
    let mut rules = Enabled {
        rules: RULES
            .iter()
            .filter(|r| policy.enabled(r) || policies.iter().any(|(_, _, p)| p.enabled(r)))
            .map(|r| (r.name, (r.make)()))
            .collect(),
        findings: Vec::new(),
    };
    let escape = input.doc.escape;
    let nodes = &input.doc.nodes;
    let file = FileCx { input, nodes };
    rules.each(|r, out| r.file(&file, out));

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

    let mut stage_names: BTreeMap<String, usize> = BTreeMap::new();
    let typed = input.typed;
    // Each typed instruction's parse node, by position: one lookup each, whatever the size.
    let by_position: std::collections::HashMap<(usize, usize), &Node> = nodes
        .iter()
        .map(|n| ((n.span.line, n.span.column), n))
        .collect();
    let node_of =
        |l: &Located| -> Option<&Node> { by_position.get(&(l.span.line, l.span.column)).copied() };
    let mut i = 0;
    while i < typed.len() {
        let Instruction::From {
            image,
            alias,
            platform,
        } = &typed[i].instruction
        else {
            // Before the first FROM (global ARGs).
            let never = |_: &str| false;
            let at = InstrCx {
                located: &typed[i],
                node: node_of(&typed[i]),
                line: typed[i].span.line,
                column: typed[i].span.column,
                escape,
                known: &never,
                ignore: input.ignore,
            };
            rules.each(|r, out| r.instruction(None, &at, out));
            i += 1;
            continue;
        };
        let from = &typed[i];
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
        let stage = FromCx {
            input,
            escape,
            line: from.span.line,
            column: from.span.column,
            node: node_of(from),
            image,
            alias: alias.as_deref(),
            platform: platform.as_deref(),
            global: &global,
            global_known: &global_known,
            earlier: alias.as_ref().and_then(|a| stage_names.get(a).copied()),
            base_stage,
            resolved_image: &resolved_image,
        };
        rules.each(|r, out| r.from(&stage, out));
        if let Some(name) = alias {
            stage_names.entry(name.clone()).or_insert(from.span.line);
        }

        // What the stage's instructions can see: its ARGs and ENVs so far, and its base's
        // environment when known (stage bases: not tracked; scratch has PATH only).
        let mut declared: BTreeSet<String> = BTreeSet::new();
        let mut env_known: Option<BTreeSet<String>> = if base_stage || image == "scratch" {
            (image == "scratch").then(|| ["PATH".to_string()].into_iter().collect())
        } else {
            input
                .bases
                .env(&resolved_image)
                .map(|e| e.into_iter().map(|(k, _)| k).collect())
        };
        i += 1;
        while i < typed.len() && !matches!(typed[i].instruction, Instruction::From { .. }) {
            let l = &typed[i];
            let known = |n: &str| {
                declared.contains(n)
                    || crate::frontend::scope::PROXY_ARGS.contains(&n)
                    || input.platform_args.contains_key(n)
                    || env_known.as_ref().is_none_or(|e| e.contains(n))
            };
            let at = InstrCx {
                located: l,
                node: node_of(l),
                line: l.span.line,
                column: l.span.column,
                escape,
                known: &known,
                ignore: input.ignore,
            };
            rules.each(|r, out| r.instruction(Some(&stage), &at, out));
            match &l.instruction {
                Instruction::Env(kvs) => {
                    if let Some(e) = env_known.as_mut() {
                        e.extend(kvs.iter().map(|(k, _)| k.clone()));
                    }
                    // An ENV whose key is itself expanded is not tracked; treat it known.
                    declared.extend(kvs.iter().map(|(k, _)| k.clone()));
                }
                Instruction::Arg(decls) => declared.extend(decls.iter().map(|(k, _)| k.clone())),
                _ => {}
            }
            i += 1;
        }
        rules.each(|r, out| r.stage_end(out));
    }
    let mut out = rules.findings;
    out.retain(|f| {
        RULES
            .iter()
            .find(|r| r.name == f.rule)
            .is_some_and(|r| policy_at(f.line).enabled(r))
    });
    out.sort_by_key(|f| (f.line, f.column));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_table_names_each_rule_once() {
        let names: BTreeSet<&str> = RULES.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), RULES.len());
        assert!(RULES.iter().all(|r| !r.description.is_empty()));
    }
}
