//! UndefinedVar: a `$VAR` no ARG, ENV, base image or predefined arg defines at that point.

use super::{undefined_in, FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct UndefinedVar;

impl Rule for UndefinedVar {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        if stage.is_none() {
            return;
        }
        let texts: Vec<&str> = match &i.located.instruction {
            Instruction::Workdir(w) | Instruction::User(w) | Instruction::Stopsignal(w) => {
                vec![w]
            }
            Instruction::Env(kvs) | Instruction::Label(kvs) => kvs
                .iter()
                .flat_map(|(k, v)| [k.as_str(), v.as_str()])
                .collect(),
            Instruction::Arg(decls) => decls.iter().filter_map(|(_, v)| v.as_deref()).collect(),
            Instruction::Expose(ports) | Instruction::Volume(ports) => {
                ports.iter().map(String::as_str).collect()
            }
            Instruction::Copy(c) | Instruction::Add(c) => c
                .sources
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(c.dest.as_str()))
                .collect(),
            _ => Vec::new(),
        };
        for t in texts {
            for v in undefined_in(t, i.escape, i.known) {
                out.add(
                    i.line,
                    i.column,
                    format!("Usage of undefined variable '${}'", v),
                );
            }
        }
    }
}
