//! FromAsCasing: `AS` in the casing of its `FROM`.

use super::{FromCx, Out, Rule};

#[derive(Default)]
pub struct FromAsCasing;

impl Rule for FromAsCasing {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let Some(n) = s.node.filter(|n| n.args.len() == 3) {
            let as_kw = &n.args[1];
            let from_upper = n.word == n.word.to_uppercase();
            let as_upper = as_kw == &as_kw.to_uppercase();
            if from_upper != as_upper {
                out.add(
                    s.line,
                    s.column,
                    format!("'{}' and '{}' keywords' casing do not match", as_kw, n.word),
                );
            }
        }
    }
}
