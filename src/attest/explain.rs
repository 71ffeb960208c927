//! Why two images differ, from their provenance: first the inputs that differ (context files
//! by path, build args, images by digest, URLs, the build file), then each differing layer
//! with the step that produced it and the inputs of that step that changed.
//!
//! A step's layer differs because its instruction changed, because something it read
//! changed (context files under its sources, a stage or image it copies from, a URL, a build
//! arg in its environment), or because a step before it changed (an earlier step of its
//! stage, or what the stage starts from). When none of these changed, the step itself is not
//! reproducible, and the explanation says so.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::provenance::Recorded;
use crate::oci::image::LayerRef;

/// How many `--from` stages deep a stage's change is explained.
const MAX_STAGE_DEPTH: usize = 4;

/// A context path whose leaf differs: (path, before, after); `None` is absent.
type FileChange = (String, Option<Value>, Option<Value>);

fn leaf_summary(v: &Option<Value>) -> String {
    match v {
        None => "absent".into(),
        Some(l) => match (l["digest"].as_str(), l["link"].as_str()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => format!("symlink to {}", t),
            _ => format!(
                "{} mode {}",
                l["type"].as_str().unwrap_or("?"),
                l["mode"].as_str().unwrap_or("?")
            ),
        },
    }
}

/// Whether a context path is read by a COPY/ADD source as written in the build file.
fn covered_by(path: &str, source: &str) -> bool {
    let s = source
        .trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/');
    let s = s.trim_end_matches("/.");
    if s.is_empty() || s == "." {
        return true;
    }
    if path == s || (path.starts_with(s) && path.as_bytes().get(s.len()) == Some(&b'/')) {
        return true;
    }
    // A wildcard source matches segment by segment; a match reads everything below it.
    if s.contains(['*', '?', '[']) {
        let pattern: Vec<&str> = s.split('/').collect();
        let parts: Vec<&str> = path.split('/').collect();
        return parts.len() >= pattern.len()
            && pattern
                .iter()
                .zip(&parts)
                .all(|(pat, name)| crate::context::segment_match(pat, name));
    }
    false
}

fn map_changes(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<Value> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| json!({"name": k, "a": a.get(k), "b": b.get(k)}))
        .collect()
}

/// The explanation, as JSON: `inputs` (what differs among the recorded inputs) and
/// `layers` (each differing layer with its step and causes).
pub fn explain(a: &Recorded, la: &[LayerRef], b: &Recorded, lb: &[LayerRef]) -> Value {
    let files: Vec<FileChange> = {
        let paths: BTreeSet<&String> = a.files.keys().chain(b.files.keys()).collect();
        paths
            .into_iter()
            .filter(|p| a.files.get(*p) != b.files.get(*p))
            .map(|p| (p.clone(), a.files.get(p).cloned(), b.files.get(p).cloned()))
            .collect()
    };
    let args = map_changes(&a.args, &b.args);
    let images = map_changes(&a.images, &b.images);
    let urls = map_changes(&a.urls, &b.urls);
    let mut inputs = json!({
        "context": files.iter().map(|(p, x, y)| json!({"path": p, "a": x, "b": y})).collect::<Vec<_>>(),
        "args": args,
        "images": images,
        "urls": urls,
    });
    if a.build_file_digest != b.build_file_digest || a.build_file != b.build_file {
        inputs["buildFile"] = json!({
            "a": {"path": a.build_file, "digest": a.build_file_digest},
            "b": {"path": b.build_file, "digest": b.build_file_digest},
        });
    }
    if a.platform != b.platform {
        inputs["platform"] = json!({"a": a.platform, "b": b.platform});
    }
    if a.target != b.target {
        inputs["target"] = json!({"a": a.target, "b": b.target});
    }
    let keys: BTreeSet<&String> = a.options.keys().chain(b.options.keys()).collect();
    let options: Vec<Value> = keys
        .into_iter()
        .filter(|k| a.options.get(*k) != b.options.get(*k))
        .map(|k| json!({"name": k, "a": a.options.get(k), "b": b.options.get(k)}))
        .collect();
    if !options.is_empty() {
        inputs["options"] = json!(options);
    }
    if a.epoch != b.epoch {
        inputs["sourceDateEpoch"] = json!({"a": a.epoch, "b": b.epoch});
    }

    let cx = Compare {
        a,
        b,
        files: &files,
    };
    let mut layers = Vec::new();
    for i in 0..la.len().max(lb.len()) {
        let (xa, xb) = (la.get(i), lb.get(i));
        if xa.map(|l| &l.diff_id) == xb.map(|l| &l.diff_id) {
            continue;
        }
        let step_b = xb.and_then(|l| cx.step_with_layer(b, &l.diff_id.to_string()));
        let step_a = xa.and_then(|l| cx.step_with_layer(a, &l.diff_id.to_string()));
        let mut entry = json!({
            "index": i + 1,
            "a": xa.map(|l| l.digest.to_string()),
            "b": xb.map(|l| l.digest.to_string()),
        });
        match step_b.or(step_a) {
            Some(step) => {
                entry["step"] = step_summary(step);
                let (sa, sb) = match step_b {
                    Some(sb) => (cx.same_step(a, sb), Some(sb)),
                    None => (Some(step), None),
                };
                entry["causes"] = json!(cx.causes(sa, sb));
            }
            None => {
                // No step made it: it came with the image the target stage starts from.
                let base = cx.base_of_target();
                let mut causes: Vec<String> = match &base {
                    Some((_, image)) => cx.image_change(image).into_iter().collect(),
                    None => Vec::new(),
                };
                if causes.is_empty() {
                    causes.extend(images.iter().map(|c| {
                        format!(
                            "image {} changed ({} -> {})",
                            c["name"].as_str().unwrap_or(""),
                            c["a"].as_str().unwrap_or("absent"),
                            c["b"].as_str().unwrap_or("absent")
                        )
                    }));
                }
                if causes.is_empty() {
                    causes
                        .push("it comes from the base image, not from a step of this build".into());
                }
                entry["base"] = match base {
                    Some((stage, image)) => json!({"stage": stage, "image": image}),
                    None => json!({}),
                };
                entry["causes"] = json!(causes);
            }
        }
        layers.push(entry);
    }
    json!({"inputs": inputs, "layers": layers})
}

fn step_summary(s: &Value) -> Value {
    json!({
        "stage": s["stage"],
        "step": s["step"],
        "line": s["line"],
        "op": s["op"],
    })
}

struct Compare<'x> {
    a: &'x Recorded,
    b: &'x Recorded,
    files: &'x [FileChange],
}

impl<'x> Compare<'x> {
    fn step_with_layer<'r>(&self, r: &'r Recorded, diff_id: &str) -> Option<&'r Value> {
        r.steps
            .iter()
            .rev()
            .find(|s| s["layer"]["diffID"].as_str() == Some(diff_id))
    }

    /// The step of `r` at the same place (stage and position) as `s`.
    fn same_step<'r>(&self, r: &'r Recorded, s: &Value) -> Option<&'r Value> {
        r.steps
            .iter()
            .find(|t| t["stageIndex"] == s["stageIndex"] && t["step"] == s["step"])
    }

    /// Why step `sa` (in a) and `sb` (in b) made different layers.
    fn causes(&self, sa: Option<&Value>, sb: Option<&Value>) -> Vec<String> {
        let (Some(sa), Some(sb)) = (sa, sb) else {
            return vec![match sb {
                Some(_) => "the step is new in b".to_string(),
                None => "the step is gone in b".to_string(),
            }];
        };
        let mut causes = Vec::new();
        if sa["op"] != sb["op"] {
            causes.push(format!(
                "the build file changed: line {} `{}` -> line {} `{}`",
                sa["line"],
                sa["op"].as_str().unwrap_or(""),
                sb["line"],
                sb["op"].as_str().unwrap_or("")
            ));
        }
        causes.extend(self.input_causes(sa, sb, 0));
        // An empty key is one that never repeats (a URL without --checksum upstream).
        let unkeyed = sb["cacheKey"] == "" || sa["cacheKey"] == "";
        if causes.is_empty() && (unkeyed || sa["cacheKey"] != sb["cacheKey"]) {
            causes.extend(self.earlier_causes(sb));
        }
        if causes.is_empty() {
            causes.push(
                "its instruction and inputs are the same: the step's output depends on something \
                 builder does not see (the time, randomness, the network), so it is not \
                 reproducible"
                    .into(),
            );
        }
        causes
    }

    /// What changed among the inputs of a step; `depth` counts the stages followed through
    /// `--from` so far (bounded: a stage's cause is shown a few stages deep, not forever).
    fn input_causes(&self, sa: &Value, sb: &Value, depth: usize) -> Vec<String> {
        let list = |s: &Value| s["inputs"].as_array().cloned().unwrap_or_default();
        let (ia, ib) = (list(sa), list(sb));
        let find =
            |v: &[Value], kind: &str, key: &Value| v.iter().find(|x| &x[kind] == key).cloned();
        let mut out = Vec::new();
        for x in &ib {
            if let Some(src) = x["context"].as_str() {
                let before = find(&ia, "context", &x["context"]);
                if before.as_ref().map(|y| &y["digest"]) == Some(&x["digest"]) {
                    continue;
                }
                let changed: Vec<&FileChange> = self
                    .files
                    .iter()
                    .filter(|(p, ..)| covered_by(p, src))
                    .collect();
                if changed.is_empty() {
                    out.push(format!("the files of `{}` changed", src));
                }
                for (p, fa, fb) in changed {
                    out.push(format!(
                        "{} changed ({} -> {})",
                        p,
                        leaf_summary(fa),
                        leaf_summary(fb)
                    ));
                }
            } else if x["stage"].is_string() {
                let before = find(&ia, "stage", &x["stage"]);
                if before.as_ref().map(|y| &y["key"]) != Some(&x["key"]) {
                    let name = x["stage"].as_str().unwrap_or("");
                    let mut why = format!("stage {} changed", name);
                    if let Some(first) = self.first_changed_step_of(name) {
                        let label =
                            format!("{}: {}", first["step"], first["op"].as_str().unwrap_or(""));
                        let deeper = if depth < MAX_STAGE_DEPTH {
                            let sa = self.same_step(self.a, first);
                            let mut d = self.own_causes(sa, first, depth + 1);
                            if d.is_empty() {
                                d = self.earlier_causes(first);
                            }
                            d
                        } else {
                            Vec::new()
                        };
                        if deeper.is_empty() {
                            why.push_str(&format!(" (its step {})", label));
                        } else {
                            why.push_str(&format!(
                                " (its step {}, because {})",
                                label,
                                deeper
                                    .iter()
                                    .map(|c| c.trim_start())
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            ));
                        }
                    }
                    out.push(why);
                }
            } else if let Some((kind, label)) = ["image", "url"]
                .into_iter()
                .find_map(|k| x[k].as_str().map(|v| (k, v)))
            {
                // An image or URL read by digest: named with both digests when it changed.
                let before = find(&ia, kind, &x[kind]);
                let was = before.as_ref().and_then(|y| y["digest"].as_str());
                if was != x["digest"].as_str() {
                    let what = if kind == "image" {
                        format!("image {}", label)
                    } else {
                        label.to_string()
                    };
                    out.push(format!(
                        "{} changed ({} -> {})",
                        what,
                        was.unwrap_or("absent"),
                        x["digest"].as_str().unwrap_or("")
                    ));
                }
            } else if let Some(args_b) = x["args"].as_object() {
                let empty = serde_json::Map::new();
                let args_a = ia
                    .iter()
                    .find_map(|y| y["args"].as_object())
                    .unwrap_or(&empty);
                let keys: BTreeSet<&String> = args_a.keys().chain(args_b.keys()).collect();
                for k in keys {
                    let (va, vb) = (args_a.get(k), args_b.get(k));
                    if va != vb {
                        let show = |v: Option<&Value>| {
                            v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into())
                        };
                        out.push(format!(
                            "build arg {} changed ({} -> {})",
                            k,
                            show(va),
                            show(vb)
                        ));
                    }
                }
            }
        }
        out
    }

    /// The first step of stage `name` (in b) whose layer differs from a's.
    fn first_changed_step_of(&self, name: &str) -> Option<&'x Value> {
        self.b
            .steps
            .iter()
            .filter(|s| s["stage"].as_str() == Some(name))
            .find(|s| self.layer_changed(s))
    }

    /// Whether step `s` of b made another layer than the same step of a (or a lacks it).
    fn layer_changed(&self, s: &Value) -> bool {
        self.same_step(self.a, s).map(|t| &t["layer"]["diffID"]) != Some(&s["layer"]["diffID"])
    }

    /// The causes behind a step whose own instruction and inputs are unchanged: an earlier
    /// step of its stage whose layer changed, else what the stage starts from (followed
    /// through parent stages).
    fn earlier_causes(&self, sb: &Value) -> Vec<String> {
        let mut stage = sb["stageIndex"].as_u64();
        let mut before = sb["step"].as_u64().unwrap_or(0);
        // Each stage is visited once: the chain of parents is at most the stage count.
        for _ in 0..=self.b.stage_bases.len() {
            let Some(si) = stage else { break };
            let changed = self
                .b
                .steps
                .iter()
                .filter(|s| s["stageIndex"].as_u64() == Some(si))
                .filter(|s| s["step"].as_u64().unwrap_or(0) < before)
                .rev()
                .find(|s| self.layer_changed(s));
            if let Some(s) = changed {
                let mut out = vec![format!(
                    "the layer of an earlier step changed (stage {}, step {}: {})",
                    s["stage"].as_str().unwrap_or(""),
                    s["step"],
                    s["op"].as_str().unwrap_or("")
                )];
                let sa = self.same_step(self.a, s);
                out.extend(self.own_causes(sa, s, 0));
                return out;
            }
            let base = self.b.stage_bases.get(&si).cloned().unwrap_or_default();
            if let Some(parent) = base.strip_prefix("stage:") {
                stage = self.stage_index(parent);
                before = u64::MAX;
                continue;
            }
            if let Some(c) = self.image_change(&base) {
                return vec![format!("its base {}", c)];
            }
            break;
        }
        Vec::new()
    }

    /// The direct causes of a step (its instruction and inputs), without following parents.
    fn own_causes(&self, sa: Option<&Value>, sb: &Value, depth: usize) -> Vec<String> {
        match sa {
            Some(sa) => {
                let mut c = Vec::new();
                if sa["op"] != sb["op"] {
                    c.push(format!(
                        "the build file changed: `{}` -> `{}`",
                        sa["op"].as_str().unwrap_or(""),
                        sb["op"].as_str().unwrap_or("")
                    ));
                }
                c.extend(self.input_causes(sa, sb, depth));
                c
            }
            None => vec!["the step is new in b".into()],
        }
    }

    fn stage_index(&self, name: &str) -> Option<u64> {
        self.b
            .stage_names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(i, _)| *i)
            .or_else(|| name.parse().ok())
    }

    /// `image R changed (a -> b)` when the image a stage starts from differs.
    fn image_change(&self, reference: &str) -> Option<String> {
        if reference == "scratch" || reference.is_empty() {
            return None;
        }
        let (da, db) = (self.a.images.get(reference), self.b.images.get(reference));
        (da != db).then(|| {
            format!(
                "image {} changed ({} -> {})",
                reference,
                da.map(String::as_str).unwrap_or("absent"),
                db.map(String::as_str).unwrap_or("absent")
            )
        })
    }

    /// The stage the image's base layers come from and the image it starts from: the
    /// target stage, followed through `FROM <stage>`.
    fn base_of_target(&self) -> Option<(String, String)> {
        let mut stage = self.b.target_stage?;
        for _ in 0..=self.b.stage_bases.len() {
            let base = self.b.stage_bases.get(&stage)?;
            match base.strip_prefix("stage:") {
                Some(parent) => stage = self.stage_index(parent)?,
                None => {
                    let name = self.b.stage_names.get(&stage).cloned().unwrap_or_default();
                    return Some((name, base.clone()));
                }
            }
        }
        None
    }
}

/// The explanation as text: the differing inputs, then one line per differing layer.
pub fn render(x: &Value) -> String {
    let mut out = String::new();
    let inputs = &x["inputs"];
    let mut lines = Vec::new();
    if let Some(bf) = inputs.get("buildFile") {
        lines.push(format!(
            "build file {}: {} -> {}",
            bf["b"]["path"].as_str().unwrap_or(""),
            bf["a"]["digest"].as_str().unwrap_or(""),
            bf["b"]["digest"].as_str().unwrap_or("")
        ));
    }
    for c in inputs["context"].as_array().into_iter().flatten() {
        let leaf = |v: &Value| leaf_summary(&(!v.is_null()).then(|| v.clone()));
        lines.push(format!(
            "context file {}: {} -> {}",
            c["path"].as_str().unwrap_or(""),
            leaf(&c["a"]),
            leaf(&c["b"])
        ));
    }
    let show = |v: &Value| {
        v.as_str()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unset".into())
    };
    for (what, key) in [("build arg", "args"), ("image", "images"), ("url", "urls")] {
        for c in inputs[key].as_array().into_iter().flatten() {
            lines.push(format!(
                "{} {}: {} -> {}",
                what,
                c["name"].as_str().unwrap_or(""),
                show(&c["a"]),
                show(&c["b"])
            ));
        }
    }
    for c in inputs["options"].as_array().into_iter().flatten() {
        let show = |v: &Value| match v {
            Value::Null => "unset".to_string(),
            v => v.to_string(),
        };
        lines.push(format!(
            "build option {}: {} -> {}",
            c["name"].as_str().unwrap_or(""),
            show(&c["a"]),
            show(&c["b"])
        ));
    }
    for k in ["platform", "target", "sourceDateEpoch"] {
        if let Some(c) = inputs.get(k) {
            lines.push(format!("{}: {} -> {}", k, c["a"], c["b"]));
        }
    }
    if lines.is_empty() {
        out.push_str("inputs: the same\n");
    } else {
        out.push_str("inputs that differ:\n");
        for l in lines {
            out.push_str(&format!("  {}\n", l));
        }
    }
    for l in x["layers"].as_array().into_iter().flatten() {
        let causes: Vec<&str> = l["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        let place = match l.get("step") {
            Some(s) => format!(
                "stage {}, step {}: {}",
                s["stage"].as_str().unwrap_or(""),
                s["step"],
                s["op"].as_str().unwrap_or("")
            ),
            None => match (l["base"]["stage"].as_str(), l["base"]["image"].as_str()) {
                (Some(stage), Some(image)) => format!("stage {}, FROM {}", stage, image),
                _ => "from the base image".to_string(),
            },
        };
        let (first, rest) = causes
            .split_first()
            .map(|(f, r)| (*f, r))
            .unwrap_or(("", &[]));
        out.push_str(&format!(
            "layer {} ({}) differs because {}\n",
            l["index"], place, first
        ));
        for c in rest {
            out.push_str(&format!("  and {}\n", c.trim_start()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_cover_paths() {
        assert!(covered_by("src/f7", "src"));
        assert!(covered_by("src/f7", "./src/"));
        assert!(covered_by("src/f7", "."));
        assert!(!covered_by("srcx/f7", "src"));
        assert!(covered_by("src/f7", "src/*"));
        assert!(covered_by("a/b.txt", "*/b.txt"));
        assert!(!covered_by("a/b.md", "*.txt"));
    }
}
