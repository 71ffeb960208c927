//! Text shown to users: long values cut to a bounded length, and the window of a long
//! source line an error shows around its column.

/// At most `max` characters of `s`: a longer text is cut and says how much was left out,
/// so that no message grows with its input.
pub fn abbreviate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let count = s.chars().count();
    if count <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let head: String = s.chars().take(max).collect();
    std::borrow::Cow::Owned(format!("{}… ({} more characters)", head, count - max))
}

/// How much of a source line an error shows around its column.
pub const SHOWN_LINE: usize = 160;

/// The part of `line` an error shows, and the caret's offset in it.
pub fn window(line: &str, column: usize) -> (String, usize) {
    let chars: Vec<char> = line
        .chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .collect();
    let col = column.saturating_sub(1).min(chars.len());
    if chars.len() <= SHOWN_LINE {
        return (chars.iter().collect(), col);
    }
    let start = col.saturating_sub(SHOWN_LINE / 2);
    let end = (start + SHOWN_LINE).min(chars.len());
    let mut shown = String::new();
    let mut caret = col - start;
    if start > 0 {
        shown.push('…');
        caret += 1;
    }
    shown.extend(&chars[start..end]);
    if end < chars.len() {
        shown.push('…');
    }
    (shown, caret)
}

/// The source line an error is at, with a caret under `column`, as two indented lines
/// after the message; nothing when the line is empty.
pub fn caret_under(line: &str, column: usize) -> String {
    if line.is_empty() {
        return String::new();
    }
    let (shown, caret) = window(line, column);
    format!("\n  {}\n  {}^", shown, " ".repeat(caret))
}
