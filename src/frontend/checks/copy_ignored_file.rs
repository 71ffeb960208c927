//! CopyIgnoredFile: a COPY or ADD of a context file that `.dockerignore` leaves out.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::Instruction;

#[derive(Default)]
pub struct CopyIgnoredFile;

impl Rule for CopyIgnoredFile {
    fn instruction(&mut self, stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        let (Some(_), Instruction::Copy(c) | Instruction::Add(c)) = (stage, &i.located.instruction)
        else {
            return;
        };
        if c.from.is_some() || i.ignore.is_empty() {
            return;
        }
        let verb = if matches!(i.located.instruction, Instruction::Add(_)) {
            "Add"
        } else {
            "Copy"
        };
        for s in &c.sources {
            if s.contains('$') || s.starts_with("<<") || s.contains("://") {
                continue;
            }
            let rel = crate::syntax::dockerignore::clean_path(&format!("/{}", s));
            let rel = rel.trim_start_matches('/');
            if !rel.is_empty() && i.ignore.is_ignored(rel) {
                out.add(
                    i.line,
                    i.column,
                    format!(
                        "Attempting to {} file \"{}\" that is excluded by .dockerignore",
                        verb, s
                    ),
                );
            }
        }
    }
}
