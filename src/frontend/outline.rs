//! `--call outline` and `--call targets`, as buildx 0.15+ prints them: what a build file
//! offers without building it. Read from the parsed file alone (a description is a comment
//! right above a `FROM` or `ARG` that starts with the stage's or the arg's name).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::syntax::instruction::{Instruction, Located};
use crate::syntax::mount::{Mount, MountType};
use crate::syntax::Document;

/// One stage of the file.
struct Stage<'a> {
    index: usize,
    name: Option<String>,
    base: String,
    line: usize,
    instructions: Vec<&'a Located>,
}

fn stages(typed: &[Located]) -> (Vec<&Located>, Vec<Stage<'_>>) {
    let mut globals = Vec::new();
    let mut out: Vec<Stage> = Vec::new();
    for l in typed {
        match &l.instruction {
            Instruction::From { image, alias, .. } => out.push(Stage {
                index: out.len(),
                name: alias.clone(),
                base: image.clone(),
                line: l.span.line,
                instructions: Vec::new(),
            }),
            _ => match out.last_mut() {
                Some(s) => s.instructions.push(l),
                None => globals.push(l),
            },
        }
    }
    (globals, out)
}

/// The description of `name` defined at line `line` (1-based), as BuildKit's
/// `getDocComment`: from the comments right above it, the first that starts with the name
/// and a space, without them.
fn description(doc: &Document, line: usize, name: Option<&str>) -> String {
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return String::new();
    };
    let Ok(i) = doc.nodes.binary_search_by_key(&line, |n| n.span.line) else {
        return String::new();
    };
    let prefix = format!("{} ", name);
    doc.nodes[i]
        .comments
        .iter()
        .find_map(|c| c.strip_prefix(&prefix))
        .unwrap_or("")
        .to_string()
}

fn stage_label(s: &Stage) -> String {
    s.name.clone().unwrap_or_else(|| s.index.to_string())
}

/// The stages `target` needs, itself included, in file order.
fn closure<'s, 'a>(all: &'s [Stage<'a>], target: usize) -> Vec<&'s Stage<'a>> {
    let find = |r: &str| {
        all.iter()
            .position(|s| s.name.as_deref() == Some(r) || s.index.to_string() == r)
    };
    let mut seen = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if !seen.insert(i) {
            continue;
        }
        let s = &all[i];
        let mut refs = vec![s.base.clone()];
        for l in &s.instructions {
            match &l.instruction {
                Instruction::Copy(c) | Instruction::Add(c) => refs.extend(c.from.clone()),
                Instruction::Run(r) => refs.extend(
                    r.mounts
                        .iter()
                        .filter_map(|m| Mount::parse(m).ok())
                        .filter_map(|m| m.from),
                ),
                _ => {}
            }
        }
        for r in refs {
            if let Some(j) = find(&r).filter(|j| *j < i) {
                todo.push(j);
            }
        }
    }
    seen.into_iter().map(|i| &all[i]).collect()
}

/// The target stage's index: `target` by name, else the last stage.
fn target_index(all: &[Stage], target: Option<&str>) -> Result<usize, String> {
    match target {
        None => all
            .len()
            .checked_sub(1)
            .ok_or_else(|| "the build file has no FROM".to_string()),
        Some(t) => all
            .iter()
            .position(|s| s.name.as_deref() == Some(t))
            .ok_or_else(|| format!("target stage {:?} could not be found", t)),
    }
}

/// `--call targets`: every named stage (and the default one) with its description.
pub fn targets(doc: &Document, typed: &[Located]) -> Value {
    let (_, all) = stages(typed);
    let last = all.len().saturating_sub(1);
    let list: Vec<Value> = all
        .iter()
        .filter(|s| s.name.is_some() || s.index == last)
        .map(|s| {
            json!({
                "name": stage_label(s),
                "description": description(doc, s.line, s.name.as_deref()),
                "base": s.base,
                "default": s.index == last,
                "line": s.line,
            })
        })
        .collect();
    json!({"targets": list})
}

/// `--call outline`: the target, the build args its stages declare (with their defaults,
/// descriptions and the stages that declare them), and its secret and ssh mounts.
pub fn outline(doc: &Document, typed: &[Located], target: Option<&str>) -> Result<Value, String> {
    let (globals, all) = stages(typed);
    let t = target_index(&all, target)?;
    let needed = closure(&all, t);
    // name -> (default, description, used by)
    let mut args: BTreeMap<String, (Option<String>, String, Vec<String>)> = BTreeMap::new();
    for l in &globals {
        if let Instruction::Arg(list) = &l.instruction {
            for (k, v) in list {
                args.insert(
                    k.clone(),
                    (
                        v.clone(),
                        description(doc, l.span.line, Some(k)),
                        Vec::new(),
                    ),
                );
            }
        }
    }
    let mut secrets: BTreeMap<String, bool> = BTreeMap::new();
    let mut ssh: BTreeMap<String, bool> = BTreeMap::new();
    for s in &needed {
        let label = stage_label(s);
        for (k, entry) in args.iter_mut() {
            let named =
                s.base.contains(&format!("${}", k)) || s.base.contains(&format!("${{{}", k));
            if named && !entry.2.contains(&label) {
                entry.2.push(label.clone());
            }
        }
        for l in &s.instructions {
            match &l.instruction {
                Instruction::Arg(list) => {
                    for (k, v) in list {
                        let entry = args.entry(k.clone()).or_insert_with(|| {
                            (None, description(doc, l.span.line, Some(k)), Vec::new())
                        });
                        if v.is_some() {
                            entry.0 = v.clone();
                        }
                        if !entry.2.contains(&label) {
                            entry.2.push(label.clone());
                        }
                    }
                }
                Instruction::Run(r) => {
                    for m in r.mounts.iter().filter_map(|m| Mount::parse(m).ok()) {
                        match m.kind {
                            MountType::Secret => {
                                let id = m.id.clone().or_else(|| {
                                    m.target
                                        .as_ref()
                                        .and_then(|t| t.rsplit('/').next().map(str::to_string))
                                });
                                if let Some(id) = id {
                                    *secrets.entry(id).or_default() |= m.required;
                                }
                            }
                            MountType::Ssh => {
                                let id = m.id.clone().unwrap_or_else(|| "default".into());
                                *ssh.entry(id).or_default() |= m.required;
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let target_stage = &all[t];
    Ok(json!({
        "name": stage_label(target_stage),
        "description": description(doc, target_stage.line, target_stage.name.as_deref()),
        "args": args.into_iter().filter(|(_, (_, _, used))| !used.is_empty()).map(|(k, (v, d, used))| json!({
            "name": k, "value": v, "description": d, "usedBy": used,
        })).collect::<Vec<_>>(),
        "secrets": secrets.into_iter().map(|(id, req)| json!({"id": id, "required": req})).collect::<Vec<_>>(),
        "ssh": ssh.into_iter().map(|(id, req)| json!({"id": id, "required": req})).collect::<Vec<_>>(),
    }))
}

/// The outline as a table, as buildx prints it.
pub fn render_outline(v: &Value) -> String {
    let mut out = format!("TARGET:      {}\n", v["name"].as_str().unwrap_or(""));
    if let Some(d) = v["description"].as_str().filter(|d| !d.is_empty()) {
        out.push_str(&format!("DESCRIPTION: {}\n", d));
    }
    let args = v["args"].as_array().cloned().unwrap_or_default();
    if !args.is_empty() {
        out.push_str(&format!(
            "\n{:<20} {:<20} {:<24} {}\n",
            "BUILD ARG", "VALUE", "USED BY", "DESCRIPTION"
        ));
        for a in &args {
            let used: Vec<&str> = a["usedBy"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str())
                .collect();
            out.push_str(&format!(
                "{:<20} {:<20} {:<24} {}\n",
                a["name"].as_str().unwrap_or(""),
                a["value"].as_str().unwrap_or("<unset>"),
                used.join(","),
                a["description"].as_str().unwrap_or("")
            ));
        }
    }
    for (title, key) in [("SECRET", "secrets"), ("SSH", "ssh")] {
        let list = v[key].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{:<20} {}\n", title, "REQUIRED"));
        for s in &list {
            out.push_str(&format!(
                "{:<20} {}\n",
                s["id"].as_str().unwrap_or(""),
                if s["required"].as_bool() == Some(true) {
                    "true"
                } else {
                    ""
                }
            ));
        }
    }
    out
}

/// The targets as a table.
pub fn render_targets(v: &Value) -> String {
    let mut out = format!("{:<28} {}\n", "TARGET", "DESCRIPTION");
    for t in v["targets"].as_array().into_iter().flatten() {
        let mut name = t["name"].as_str().unwrap_or("").to_string();
        if t["default"].as_bool() == Some(true) {
            name.push_str(" (default)");
        }
        out.push_str(&format!(
            "{:<28} {}\n",
            name,
            t["description"].as_str().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# syntax=docker/dockerfile:1\n# GO_VERSION sets the Go version\nARG GO_VERSION=1.22\n\n# build compiles the app\nFROM golang:${GO_VERSION} AS build\n# the flavour, not described\nARG FLAVOR=plain\nRUN --mount=type=secret,id=token,required=true --mount=type=ssh make\n\nFROM scratch AS unused\nARG NEVER=1\n\n# release is what ships\nFROM scratch AS release\nCOPY --from=build /app /app\n";

    #[test]
    fn targets_and_outline_read_descriptions_args_and_mounts() {
        let (doc, typed) = crate::syntax::parse_instructions("Buildfile", FILE).unwrap();
        let t = targets(&doc, &typed);
        let names: Vec<&str> = t["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["build", "unused", "release"]);
        assert_eq!(t["targets"][0]["description"], "compiles the app");
        assert_eq!(
            t["targets"][1]["description"], "",
            "no comment, no description"
        );
        assert_eq!(t["targets"][2]["default"], true);
        let o = outline(&doc, &typed, None).unwrap();
        assert_eq!(o["name"], "release");
        let args: Vec<&str> = o["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            args,
            ["FLAVOR", "GO_VERSION"],
            "NEVER is in a stage release does not need"
        );
        assert_eq!(o["args"][1]["value"], "1.22");
        assert_eq!(o["args"][1]["description"], "sets the Go version");
        assert_eq!(
            o["args"][0]["description"], "",
            "a comment that does not start with the name describes nothing"
        );
        assert_eq!(o["secrets"][0]["id"], "token");
        assert_eq!(o["secrets"][0]["required"], true);
        assert_eq!(o["ssh"][0]["id"], "default");
        assert!(outline(&doc, &typed, Some("nope")).is_err());
    }
}
