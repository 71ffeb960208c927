//! ConsistentInstructionCasing: every keyword in the majority's casing.

use super::{FileCx, Out, Rule};

#[derive(Default)]
pub struct ConsistentInstructionCasing;

impl Rule for ConsistentInstructionCasing {
    fn file(&mut self, f: &FileCx, out: &mut Out) {
        let (mut upper, mut lower) = (0, 0);
        for n in f.nodes {
            if n.word == n.word.to_uppercase() {
                upper += 1;
            } else if n.word == n.word.to_lowercase() {
                lower += 1;
            }
        }
        let majority_upper = upper >= lower;
        for n in f.nodes {
            let wrong = if majority_upper {
                n.word != n.word.to_uppercase()
            } else {
                n.word != n.word.to_lowercase()
            };
            if wrong {
                out.add(
                    n.span.line,
                    n.span.column,
                    format!(
                        "Command '{}' should match the case of the command majority ({})",
                        n.word,
                        if majority_upper {
                            "uppercase"
                        } else {
                            "lowercase"
                        }
                    ),
                );
            }
        }
    }
}
