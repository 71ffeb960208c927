//! InvalidBaseImagePlatform: a base image the store holds for another platform than the
//! build's.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct InvalidBaseImagePlatform;

impl Rule for InvalidBaseImagePlatform {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if s.base_stage || s.image == "scratch" || s.platform.is_some() {
            return;
        }
        if let Some(p) = s.input.bases.platform(s.resolved_image) {
            if p != s.input.target_platform {
                out.add(
                    s.line,
                    s.column,
                    format!(
                        "Base image {} was pulled with platform \"{}\", expected \"{}\" for current build",
                        s.resolved_image, p, s.input.target_platform
                    ),
                );
            }
        }
    }
}
