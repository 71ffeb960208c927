//! RedundantTargetPlatform: `FROM --platform=$TARGETPLATFORM` is the default.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct RedundantTargetPlatform;

impl Rule for RedundantTargetPlatform {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let Some(p) = s.platform {
            if p.trim() == "$TARGETPLATFORM" || p.trim() == "${TARGETPLATFORM}" {
                out.add(
                    s.line,
                    s.column,
                    format!(
                        "Setting platform to predefined {} in FROM is redundant as this is the default behavior",
                        p.trim()
                    ),
                );
            }
        }
    }
}
