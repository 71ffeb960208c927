//! MultipleInstructionsDisallowed: one CMD, ENTRYPOINT and HEALTHCHECK per stage (all but
//! the last are found at the stage's end).

use std::collections::BTreeMap;

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct MultipleInstructionsDisallowed {
    seen: BTreeMap<&'static str, Vec<(usize, usize)>>,
}

impl Rule for MultipleInstructionsDisallowed {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, _out: &mut Out) {
        if stage.is_none() {
            return;
        }
        let which = match i.located.instruction {
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            _ => return,
        };
        self.seen.entry(which).or_default().push((i.line, i.column));
    }

    fn stage_end(&mut self, out: &mut Out) {
        for (which, at) in std::mem::take(&mut self.seen) {
            for (line, col) in at.iter().take(at.len().saturating_sub(1)) {
                out.add(
                    *line,
                    *col,
                    format!("Multiple {} instructions should not be used in the same stage because only the last one will be used", which),
                );
            }
        }
    }
}
