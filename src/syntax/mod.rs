//! Build-file syntax, kept pure (no I/O but reading the file it is given): the parser with
//! its spans and errors, typed instructions, word expansion and `.dockerignore` patterns.
//! What the instructions mean is the frontend's.

pub mod dockerignore;
pub mod error;
pub mod expand;
pub mod glob;
pub mod instruction;
pub mod mount;
pub mod parser;
pub mod quote;

pub use error::{Span, SyntaxError};
pub use instruction::{Command, Copy, Instruction, Located};
pub use parser::{parse, Document, Node};

/// Parse and type a build file in one step.
pub fn parse_instructions(
    file: &str,
    source: &str,
) -> Result<(Document, Vec<Located>), SyntaxError> {
    let doc = parse(file, source)?;
    let typed = instruction::typed(file, source, &doc)?;
    Ok((doc, typed))
}
