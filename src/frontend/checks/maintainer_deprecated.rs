//! MaintainerDeprecated: MAINTAINER is a label now.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct MaintainerDeprecated;

impl Rule for MaintainerDeprecated {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        if stage.is_some() && matches!(i.located.instruction, Instruction::Maintainer(_)) {
            out.add(
                i.line,
                i.column,
                "Maintainer instruction is deprecated in favor of using label".into(),
            );
        }
    }
}
