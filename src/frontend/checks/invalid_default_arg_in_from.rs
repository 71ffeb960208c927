//! InvalidDefaultArgInFrom: with the global ARGs' defaults alone (no `--build-arg`), FROM
//! must still name an image.

use super::{undefined_in, FromCx, Out, Rule};
use crate::syntax::expand::{LexOptions, Lexer};

#[derive(Default)]
pub struct InvalidDefaultArgInFrom;

impl Rule for InvalidDefaultArgInFrom {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if !s.image.contains('$') || !undefined_in(s.image, s.escape, s.global_known).is_empty() {
            return;
        }
        let defaults = |n: &str| -> Option<String> {
            s.global
                .get(n)
                .cloned()
                .flatten()
                .or_else(|| s.input.platform_args.get(n).cloned())
        };
        let value = Lexer::new(s.escape, LexOptions::default())
            .word(s.image, &defaults)
            .unwrap_or_default();
        let valid = !value.is_empty()
            && !value.starts_with(':')
            && !value.ends_with(':')
            && !value.contains("::")
            && !value.contains(char::is_whitespace);
        if !valid {
            let args: Vec<String> = s
                .global
                .keys()
                .filter(|k| s.image.contains(k.as_str()))
                .cloned()
                .collect();
            out.add(
                s.line,
                s.column,
                format!(
                    "Default value for ARG {} results in empty or invalid base image name",
                    if args.is_empty() {
                        s.image.to_string()
                    } else {
                        args.join(", ")
                    }
                ),
            );
        }
    }
}
