//! NoEmptyContinuation: a blank line inside a continued instruction (not a heredoc body).

use super::{FileCx, Out, Rule};

#[derive(Default)]
pub struct NoEmptyContinuation;

impl Rule for NoEmptyContinuation {
    fn file(&mut self, f: &FileCx, out: &mut Out) {
        let lines: Vec<&str> = f.input.source.lines().collect();
        for n in f.nodes.iter().filter(|n| n.heredocs.is_empty()) {
            for l in n.span.line + 1..=n.span.end_line {
                if lines.get(l - 1).is_some_and(|t| t.trim().is_empty()) {
                    out.add(
                        l,
                        1,
                        "Empty continuation line found in a command: empty continuation lines \
                         will become errors in a future release"
                            .into(),
                    );
                    break;
                }
            }
        }
    }
}
