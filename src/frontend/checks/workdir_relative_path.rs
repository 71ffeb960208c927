//! WorkdirRelativePath: a relative WORKDIR before any absolute one in the stage.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct WorkdirRelativePath {
    absolute_seen: bool,
}

impl Rule for WorkdirRelativePath {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        let (Some(_), Instruction::Workdir(w)) = (stage, &i.located.instruction) else {
            return;
        };
        if w.starts_with('/') || w.starts_with('$') {
            self.absolute_seen = true;
        } else if !self.absolute_seen {
            out.add(
                i.line,
                i.column,
                format!(
                    "Relative workdir \"{}\" can have unexpected results if the base image changes",
                    w
                ),
            );
        }
    }

    fn stage_end(&mut self, _out: &mut Out) {
        self.absolute_seen = false;
    }
}
