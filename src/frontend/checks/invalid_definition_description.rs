//! InvalidDefinitionDescription (experimental): the comment right above a named FROM or an
//! ARG is its description for `--call outline|targets`, so it should start with the name it
//! describes. BuildKit: `validateDefinitionDescription` in `instructions/parse.go`.

use super::{FromCx, InstrCx, Out, Rule};
use crate::syntax::{Instruction, Node};

#[derive(Default)]
pub struct InvalidDefinitionDescription;

fn check(
    instruction: &str,
    keys: &[&str],
    node: Option<&Node>,
    line: usize,
    column: usize,
    out: &mut Out,
) {
    let Some(last) = node.and_then(|n| n.comments.last()) else {
        return;
    };
    if keys.is_empty() {
        return;
    }
    let first_word = last.split(' ').next().unwrap_or("");
    if keys.contains(&first_word) {
        return;
    }
    let example = if keys.len() > 1 { "<arg_key>" } else { keys[0] };
    out.add(
        line,
        column,
        format!(
            "Comment for {} should follow the format: `# {} <description>`",
            instruction, example
        ),
    );
}

impl Rule for InvalidDefinitionDescription {
    fn from(&mut self, s: &FromCx, out: &mut Out) {
        if let Some(alias) = s.alias {
            check("FROM", &[alias], s.node, s.line, s.column, out);
        }
    }

    fn instruction(&mut self, _stage: Option<&FromCx>, i: &InstrCx, out: &mut Out) {
        if let Instruction::Arg(decls) = &i.located.instruction {
            let keys: Vec<&str> = decls.iter().map(|(k, _)| k.as_str()).collect();
            check("ARG", &keys, i.node, i.line, i.column, out);
        }
    }
}
