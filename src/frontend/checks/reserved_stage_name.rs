//! ReservedStageName: `scratch` and `context` are not stage names.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct ReservedStageName;

impl Rule for ReservedStageName {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let Some(name) = s.alias.filter(|n| *n == "scratch" || *n == "context") {
            out.add(
                s.line,
                s.column,
                format!(
                    "'{}' is reserved and should not be used as a stage name",
                    name
                ),
            );
        }
    }
}
