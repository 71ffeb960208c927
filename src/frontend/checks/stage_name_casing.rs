//! StageNameCasing: a stage's name written in lowercase.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct StageNameCasing;

impl Rule for StageNameCasing {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let Some(n) = s.node.filter(|n| n.args.len() == 3) {
            let written = &n.args[2];
            if written.chars().any(|c| c.is_uppercase()) {
                out.add(
                    s.line,
                    s.column,
                    format!("Stage name '{}' should be lowercase", written),
                );
            }
        }
    }
}
