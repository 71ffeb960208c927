//! ExposeInvalidFormat: EXPOSE names ports, not IP addresses or host-port mappings.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct ExposeInvalidFormat;

impl Rule for ExposeInvalidFormat {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        let (Some(_), Instruction::Expose(ports)) = (stage, &i.located.instruction) else {
            return;
        };
        for p in ports.iter().filter(|p| !p.contains('$') && p.contains(':')) {
            out.add(
                i.line,
                i.column,
                format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{}'", p),
            );
        }
    }
}
