//! InvalidBaseImagePlatform: a base image (a store name, or a local layout or archive) that
//! gives another platform than the stage asks for: its `FROM --platform`, else the build's.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct InvalidBaseImagePlatform;

impl Rule for InvalidBaseImagePlatform {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if s.base_stage || s.image == "scratch" {
            return;
        }
        // A `--platform` value: a constant, or one platform arg (`$BUILDPLATFORM`).
        let wanted = match s.platform {
            None => s.input.target_platform.to_string(),
            Some(p) => {
                let name = p
                    .trim_start_matches('$')
                    .trim_matches(|c| c == '{' || c == '}');
                if !p.contains('$') {
                    p.to_string()
                } else if let Some(v) = s.input.platform_args.get(name) {
                    v.clone()
                } else {
                    return;
                }
            }
        };
        if let Some(p) = s.input.bases.platform(s.resolved_image, &wanted) {
            let matches = p == wanted || p.starts_with(&format!("{}/", wanted));
            if !matches {
                out.add(
                    s.line,
                    s.column,
                    format!(
                        "Base image {} was pulled with platform \"{}\", expected \"{}\" for current build",
                        s.resolved_image, p, wanted
                    ),
                );
            }
        }
    }
}
