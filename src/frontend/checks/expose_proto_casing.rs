//! ExposeProtoCasing: EXPOSE's protocol in lowercase.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct ExposeProtoCasing;

impl Rule for ExposeProtoCasing {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        let (Some(_), Instruction::Expose(ports)) = (stage, &i.located.instruction) else {
            return;
        };
        for p in ports.iter().filter(|p| !p.contains('$')) {
            if let Some((_, proto)) = p.split_once('/') {
                if proto != proto.to_lowercase() {
                    out.add(
                        i.line,
                        i.column,
                        format!(
                            "Defined protocol '{}' in EXPOSE instruction should be lowercase",
                            p
                        ),
                    );
                }
            }
        }
    }
}
