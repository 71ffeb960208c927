//! UndefinedArgInFrom: FROM names only global ARGs (and the platform args).

use super::{undefined_in, FromCx, Out, Rule};

#[derive(Default)]
pub struct UndefinedArgInFrom;

impl Rule for UndefinedArgInFrom {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        for v in undefined_in(s.image, s.escape, s.global_known) {
            out.add(
                s.line,
                s.column,
                format!("FROM argument '{}' is not declared", v),
            );
        }
    }
}
