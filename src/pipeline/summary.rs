//! What a build did, step by step, for people and CI: each layered step with its platform,
//! stage, instruction, whether the cache had it and how long it took. `--metadata-file`
//! carries it as `builder.steps`; `--summary FILE` writes it as Markdown a CI system can post
//! as a job summary.

use std::time::Duration;

use serde_json::{json, Value};

use crate::attest::trace::StepTrace;

/// One platform's build and its steps.
pub struct Platform {
    pub platform: String,
    pub steps: Vec<StepTrace>,
}

/// The steps as `--metadata-file` lists them.
pub fn steps_json(platforms: &[Platform]) -> Value {
    let steps: Vec<Value> = platforms
        .iter()
        .flat_map(|p| {
            p.steps.iter().map(move |s| {
                json!({
                    "platform": p.platform,
                    "stage": s.stage_name,
                    "step": s.step,
                    "line": s.line,
                    "instruction": s.op,
                    "cached": s.cached,
                    "seconds": (s.seconds * 1000.0).round() / 1000.0,
                    "miss": s.miss,
                })
            })
        })
        .collect();
    json!(steps)
}

/// Markdown: what was built, then one row per step.
pub fn markdown(digest: &str, names: &[String], platforms: &[Platform], wall: Duration) -> String {
    let all: Vec<(&str, &StepTrace)> = platforms
        .iter()
        .flat_map(|p| p.steps.iter().map(move |s| (p.platform.as_str(), s)))
        .collect();
    let cached = all.iter().filter(|(_, s)| s.cached).count();
    let mut out = String::from("## builder build\n\n| | |\n|---|---|\n");
    out.push_str(&format!("| image | `{}` |\n", digest));
    if !names.is_empty() {
        out.push_str(&format!("| names | {} |\n", cell(&names.join(", "))));
    }
    out.push_str(&format!(
        "| steps | {} run, {} cached |\n| time | {:.1} s |\n\n",
        all.len() - cached,
        cached,
        wall.as_secs_f64()
    ));
    let several = platforms.len() > 1;
    out.push_str(if several {
        "| platform | stage | step | instruction | result | time |\n|---|---|---|---|---|---|\n"
    } else {
        "| stage | step | instruction | result | time |\n|---|---|---|---|---|\n"
    });
    for (platform, s) in all {
        if several {
            out.push_str(&format!("| {} ", platform));
        }
        out.push_str(&format!(
            "| {} | {} | `{}` | {} | {:.2} s |\n",
            cell(&s.stage_name),
            s.step,
            cell(&crate::text::abbreviate(&s.op, 100)).replace('`', "'"),
            match (&s.miss, s.cached) {
                (_, true) => "cached".to_string(),
                (Some(why), false) => format!("ran: {}", cell(why)),
                (None, false) => "ran".to_string(),
            },
            s.seconds
        ));
    }
    out
}

/// Text safe in a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(op: &str, cached: bool) -> StepTrace {
        StepTrace {
            stage: 0,
            stage_name: "build".into(),
            step: 1,
            line: 2,
            op: op.into(),
            key: String::new(),
            inputs: Vec::new(),
            layer: None,
            cached,
            seconds: 0.25,
            miss: (!cached).then(|| "a.txt changed".to_string()),
        }
    }

    #[test]
    fn a_summary_counts_and_lists_the_steps() {
        let p = [Platform {
            platform: "linux/amd64".into(),
            steps: vec![step("COPY a|b /x", true), step("RUN make", false)],
        }];
        let md = markdown("sha256:00", &["app:1".into()], &p, Duration::from_secs(3));
        assert!(md.contains("| steps | 1 run, 1 cached |"), "{md}");
        assert!(
            md.contains("| build | 1 | `COPY a\\|b /x` | cached | 0.25 s |"),
            "{md}"
        );
        assert!(md.contains("| names | app:1 |"), "{md}");
        assert!(md.contains("| ran: a.txt changed |"), "{md}");
        let j = steps_json(&p);
        assert_eq!(j[1]["instruction"], "RUN make");
        assert_eq!(j[1]["cached"], false);
        assert_eq!(j[1]["miss"], "a.txt changed");
        assert_eq!(j[0]["miss"], serde_json::Value::Null);
    }
}
