//! JSONArgsRecommended: CMD and ENTRYPOINT in exec form, unless SHELL was set in the stage.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::instruction::Command;
use crate::syntax::Instruction;

#[derive(Default)]
pub struct JsonArgsRecommended {
    shell_set: bool,
}

impl Rule for JsonArgsRecommended {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        if stage.is_none() {
            return;
        }
        match &i.located.instruction {
            Instruction::Shell(_) => self.shell_set = true,
            Instruction::Cmd(c) | Instruction::Entrypoint(c) => {
                let which = if matches!(i.located.instruction, Instruction::Cmd(_)) {
                    "CMD"
                } else {
                    "ENTRYPOINT"
                };
                if matches!(c, Command::Shell(_)) && !self.shell_set {
                    out.add(
                        i.line,
                        i.column,
                        format!("JSON arguments recommended for {} to prevent unintended behavior related to OS signals", which),
                    );
                }
            }
            _ => {}
        }
    }

    fn stage_end(&mut self, _out: &mut Out) {
        self.shell_set = false;
    }
}
