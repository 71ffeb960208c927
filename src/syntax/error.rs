//! Errors of the front end: every one carries the file, line and column it is about and renders
//! as `Buildfile:12:5: what` followed by the offending line and a caret under the column.

use std::fmt;

/// A 1-based position range in a build file. `column` is counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Span {
    /// First physical line of the instruction.
    pub line: usize,
    /// Column of the first character the span points at.
    pub column: usize,
    /// Last physical line (continuations and heredoc bodies included).
    pub end_line: usize,
}

/// A build file problem with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// The build file's name as the user gave it.
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The physical source line, for the caret display (may be empty).
    pub source_line: String,
}

impl SyntaxError {
    /// An error at `line`/`column` of `source`, whose text is used for the caret display.
    pub fn at(
        file: &str,
        source: &str,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Self {
        let source_line = source
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim_end_matches('\r')
            .to_string();
        SyntaxError {
            file: file.to_string(),
            line,
            column: column.max(1),
            message: message.into(),
            source_line,
        }
    }
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file,
            self.line,
            self.column,
            abbreviate(&self.message, 1000)
        )?;
        write!(f, "{}", caret_under(&self.source_line, self.column))
    }
}

impl std::error::Error for SyntaxError {}

pub use crate::text::{abbreviate, caret_under, window, SHOWN_LINE};

/// The nearest word of `candidates` to `word` (Levenshtein distance at most 2), for "did you mean".
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_uppercase();
    candidates
        .iter()
        .map(|c| (levenshtein(&word, &c.to_ascii_uppercase()), *c))
        .filter(|(d, c)| *d <= 2 && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting an adjacent transposition as one edit (so RNU is one from RUN).
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_run_for_rnu() {
        assert_eq!(nearest("RNU", &["RUN", "FROM", "COPY"]), Some("RUN"));
        assert_eq!(nearest("XYZZY", &["RUN", "FROM"]), None);
    }

    #[test]
    fn renders_caret_under_column() {
        let e = SyntaxError::at(
            "Buildfile",
            "FROM a\nRNU x\n",
            2,
            1,
            "unknown instruction RNU; did you mean RUN?",
        );
        assert_eq!(
            e.to_string(),
            "Buildfile:2:1: unknown instruction RNU; did you mean RUN?\n  RNU x\n  ^"
        );
    }
}
