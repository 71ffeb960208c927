//! SecretsUsedInArgOrEnv: ARG and ENV names that look like secrets (global ARGs too).

use super::{secret_like, FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct SecretsUsedInArgOrEnv;

impl Rule for SecretsUsedInArgOrEnv {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        let (kind, names): (&str, Vec<&String>) = match &i.located.instruction {
            Instruction::Arg(decls) => ("ARG", decls.iter().map(|(k, _)| k).collect()),
            Instruction::Env(kvs) if stage.is_some() => {
                ("ENV", kvs.iter().map(|(k, _)| k).collect())
            }
            _ => return,
        };
        for k in names.into_iter().filter(|k| secret_like(k)) {
            out.add(
                i.line,
                i.column,
                format!(
                    "Do not use ARG or ENV instructions for sensitive data ({} \"{}\")",
                    kind, k
                ),
            );
        }
    }
}
