//! LegacyKeyValueFormat: `ENV key=value`, not `ENV key value` (LABEL too).

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct LegacyKeyValueFormat;

impl Rule for LegacyKeyValueFormat {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        if stage.is_none() {
            return;
        }
        let kw = match i.located.instruction {
            Instruction::Env(_) => "ENV",
            Instruction::Label(_) => "LABEL",
            _ => return,
        };
        let legacy = i
            .node
            .is_some_and(|n| n.args.len() == 3 && n.args.get(2).is_some_and(|s| s.is_empty()));
        if legacy {
            out.add(
                i.line,
                i.column,
                format!(
                    "\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format"
                ),
            );
        }
    }
}
