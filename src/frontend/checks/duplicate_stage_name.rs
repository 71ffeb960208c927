//! DuplicateStageName: each stage name once.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct DuplicateStageName;

impl Rule for DuplicateStageName {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let (Some(name), Some(first)) = (s.alias, s.earlier) {
            out.add(
                s.line,
                s.column,
                format!(
                    "Duplicate stage name '{}', stage names should be unique (first on line {})",
                    name, first
                ),
            );
        }
    }
}
