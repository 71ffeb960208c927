//! FromPlatformFlagConstDisallowed: `FROM --platform` takes a variable, not a constant.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct FromPlatformFlagConstDisallowed;

impl Rule for FromPlatformFlagConstDisallowed {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let Some(p) = s.platform {
            let redundant = p.trim() == "$TARGETPLATFORM" || p.trim() == "${TARGETPLATFORM}";
            if !redundant && !p.contains('$') {
                out.add(
                    s.line,
                    s.column,
                    format!(
                        "FROM --platform flag should not use constant value \"{}\"",
                        p
                    ),
                );
            }
        }
    }
}
