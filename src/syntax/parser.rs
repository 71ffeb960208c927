//! The low-level parser: build file text -> [`Node`]s, one per instruction, before any
//! validation or expansion. It follows BuildKit's `parser` package rule for rule (line
//! assembly, directives, flag extraction, JSON-or-shell form, ENV/LABEL word rules, heredocs),
//! so every build file a `docker build` user has parses the same here. [`Node::dump`] prints
//! BuildKit's `result` format, which the external conformance corpus checks byte for byte.

use super::error::{Span, SyntaxError};
use super::expand::{LexOptions, Lexer};
use super::quote::go_quote;

/// The longest physical line BuildKit's scanner accepts.
const MAX_LINE_BYTES: usize = 65535;

/// Instructions whose argument text may open heredocs.
const HEREDOC_INSTRUCTIONS: &[&str] = &["run", "copy", "add"];

/// One `<<NAME` document attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Heredoc {
    /// The terminator word, quotes removed.
    pub name: String,
    /// The body, each line followed by `\n` (leading tabs already removed for `<<-`).
    pub content: String,
    /// False when the delimiter was quoted: the body is then taken literally.
    pub expand: bool,
    /// `<<-`: leading tabs of body lines are removed.
    pub chomp: bool,
    /// The file descriptor digits before `<<`, if any.
    pub fd: Option<u32>,
}

/// One instruction as written, with its flags and arguments split by the instruction's rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// The instruction word, lowercased (`run`); unknown words are kept too.
    pub keyword: String,
    /// The word as written (`Run`), for messages.
    pub word: String,
    /// `--name=value` flags, quotes and escapes removed.
    pub flags: Vec<String>,
    /// The arguments. ENV and LABEL hold flattened `key, value, "="|""` triples.
    pub args: Vec<String>,
    /// The instruction wrapped by ONBUILD.
    pub onbuild: Option<Box<Node>>,
    /// True when the arguments came from a JSON array (exec form).
    pub json: bool,
    /// Heredoc documents, in the order they appear on the line.
    pub heredocs: Vec<Heredoc>,
    /// The assembled logical line (continuations joined).
    pub original: String,
    /// The argument text after the flags, trimmed.
    pub rest: String,
    pub span: Span,
    /// The comment lines right above the instruction, `#` and surrounding space removed, as
    /// BuildKit's `PrevComment`: a bare `#` starts the block afresh, a blank line does not,
    /// and parser directives are not part of it. Descriptions and `# check=` come from here.
    #[serde(skip)]
    pub comments: Vec<String>,
}

/// Parser directives found at the top of the file.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Directives {
    pub syntax: Option<String>,
    pub escape: Option<char>,
    pub check: Option<String>,
}

/// A parsed build file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Document {
    pub directives: Directives,
    pub escape: char,
    pub nodes: Vec<Node>,
}

impl Document {
    /// BuildKit's dump of the whole file: one `(instr)` line per instruction.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push('(');
            out.push_str(&node.dump());
            out.push_str(")\n");
        }
        out
    }
}

impl Node {
    /// BuildKit's dump of one instruction, without the surrounding parentheses.
    pub fn dump(&self) -> String {
        let mut s = self.keyword.clone();
        if !self.flags.is_empty() {
            let flags: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(&format!(" [{}]", flags.join(" ")));
        }
        if let Some(inner) = &self.onbuild {
            s.push_str(&format!(" ({})", inner.dump()));
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(&go_quote(a));
        }
        s
    }
}

/// BuildKit's whitespace class for splitting words: ASCII space, tab, VT, FF, CR.
fn is_split_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{b}' | '\u{c}' | '\r')
}

/// Split at runs of ASCII whitespace (Go `reWhitespace.Split(s, n)`), at most `limit` pieces.
fn split_ws(s: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while out.len() + 1 < limit {
        match rest.find(is_split_space) {
            Some(i) => {
                out.push(rest[..i].to_string());
                rest = rest[i..].trim_start_matches(is_split_space);
            }
            None => break,
        }
    }
    out.push(rest.to_string());
    out
}

struct LineSource<'a> {
    lines: Vec<&'a str>,
    next: usize,
}

impl<'a> LineSource<'a> {
    fn new(text: &'a str) -> Self {
        let mut lines: Vec<&str> = text.split('\n').collect();
        if text.ends_with('\n') {
            lines.pop();
        }
        LineSource { lines, next: 0 }
    }
    /// The next physical line with trailing CR/LF removed, and its 1-based number.
    fn take(&mut self) -> Option<(usize, &'a str)> {
        let l = *self.lines.get(self.next)?;
        self.next += 1;
        Some((self.next, l.trim_end_matches(['\r', '\n'])))
    }
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Whether `line` ends in a continuation; returns the line without it.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let body = line.trim_end_matches([' ', '\t']);
    if let Some(before) = body.strip_suffix(escape) {
        // `\\` at the end is an escaped escape, not a continuation.
        if !before.ends_with(escape) {
            return (before.to_string(), true);
        }
    }
    (line.to_string(), false)
}

/// Parse `# name = value` when it is a directive line.
fn directive_of(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix('#')?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let name_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let name = &rest[..name_len];
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let rest = rest[name_len..].trim_start_matches([' ', '\t']);
    let value = rest.strip_prefix('=')?.trim_matches([' ', '\t']);
    if value.is_empty() {
        return None;
    }
    Some((name.to_ascii_lowercase(), value.to_string()))
}

/// Parse a whole build file. `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Document, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let err = |line: usize, col: usize, msg: String| SyntaxError::at(file, text, line, col, msg);
    let mut src = LineSource::new(text);
    let mut directives = Directives::default();
    let mut escape = '\\';
    let mut in_directives = true;
    let mut seen = Vec::<String>::new();
    let mut nodes = Vec::new();
    let mut comments: Vec<String> = Vec::new();

    for (n, l) in src.lines.iter().enumerate() {
        if l.len() > MAX_LINE_BYTES + 1 {
            return Err(err(
                n + 1,
                1,
                format!("line is longer than {} bytes", MAX_LINE_BYTES),
            ));
        }
    }

    while let Some((start, raw)) = src.take() {
        let first = raw.trim_start();
        if in_directives {
            match directive_of(first) {
                Some((name, value)) if ["syntax", "escape", "check"].contains(&name.as_str()) => {
                    if seen.contains(&name) {
                        return Err(err(
                            start,
                            1,
                            format!("only one {} parser directive can be used", name),
                        ));
                    }
                    seen.push(name.clone());
                    match name.as_str() {
                        "escape" => {
                            escape = match value.as_str() {
                                "`" => '`',
                                "\\" => '\\',
                                _ => {
                                    return Err(err(
                                        start,
                                        1,
                                        format!(
                                            "invalid escape token '{}' does not match ` or \\",
                                            value
                                        ),
                                    ))
                                }
                            };
                            directives.escape = Some(escape);
                        }
                        "syntax" => directives.syntax = Some(value),
                        _ => directives.check = Some(value),
                    }
                    continue;
                }
                _ => in_directives = false,
            }
        }
        if is_comment(first) {
            // As BuildKit: the line's first byte goes, whatever it is, so an indented
            // comment keeps its `#`.
            let mut after_first = raw.chars();
            after_first.next();
            match after_first.as_str().trim() {
                "" => comments.clear(),
                text => comments.push(text.to_string()),
            }
            continue;
        }
        let column = raw.chars().count() - first.chars().count() + 1;
        let (mut line, mut continues) = trim_continuation(first, escape);
        if !continues && line.trim().is_empty() {
            continue;
        }
        let mut end = start;
        while continues {
            let Some((n, next)) = src.take() else { break };
            end = n;
            if is_comment(next) || next.trim().is_empty() {
                continue;
            }
            let (piece, more) = trim_continuation(next, escape);
            line.push_str(&piece);
            continues = more;
        }
        if line.trim().is_empty() {
            continue;
        }
        let span = Span {
            line: start,
            column,
            end_line: end,
        };
        let mut node = node_from_line(&line, escape, span).map_err(|m| err(start, column, m))?;
        let heredoc_names = heredoc_words(&node, &line);
        for (name, chomp, expand, fd) in heredoc_names {
            let mut content = String::new();
            let mut terminated = false;
            while let Some((n, body)) = src.take() {
                node.span.end_line = n;
                let candidate = if chomp {
                    body.trim_start_matches('\t')
                } else {
                    body
                };
                if candidate == name {
                    terminated = true;
                    break;
                }
                content.push_str(candidate);
                content.push('\n');
            }
            if !terminated {
                return Err(err(start, column, format!("unterminated heredoc {}", name)));
            }
            node.heredocs.push(Heredoc {
                name,
                content,
                expand,
                chomp,
                fd,
            });
        }
        node.comments = std::mem::take(&mut comments);
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(SyntaxError::at(
            file,
            "",
            1,
            1,
            "the file has no instructions",
        ));
    }
    Ok(Document {
        directives,
        escape,
        nodes,
    })
}

/// The heredocs a line opens: `(name, chomp, expand, fd)` for each `[n]<<[-]NAME` word.
fn heredoc_words(node: &Node, line: &str) -> Vec<(String, bool, bool, Option<u32>)> {
    let target = node.onbuild.as_deref().unwrap_or(node);
    if !HEREDOC_INSTRUCTIONS.contains(&target.keyword.as_str())
        || target.json
        || !line.contains("<<")
    {
        return Vec::new();
    }
    let raw = LexOptions {
        raw_quotes: true,
        raw_escapes: true,
        skip_unset: false,
    };
    let words = Lexer::new('\\', raw)
        .words(line, &|_| None)
        .unwrap_or_default();
    words.iter().filter_map(|w| parse_heredoc_word(w)).collect()
}

/// `[digits]<<[-]NAME` with NAME possibly quoted; None when `word` is no heredoc opener.
pub fn parse_heredoc_word(word: &str) -> Option<(String, bool, bool, Option<u32>)> {
    let idx = word.find("<<")?;
    let digits = &word[..idx];
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &word[idx + 2..];
    let chomp = rest.starts_with('-');
    if chomp {
        rest = &rest[1..];
    }
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let cooked = Lexer::new(
        '\\',
        LexOptions {
            raw_quotes: false,
            raw_escapes: false,
            skip_unset: true,
        },
    );
    let words = cooked.words(rest, &|_| None).ok()?;
    if words.len() != 1 {
        return None;
    }
    let raw = Lexer::new(
        '\\',
        LexOptions {
            raw_quotes: true,
            raw_escapes: false,
            skip_unset: true,
        },
    );
    let raw_words = raw.words(rest, &|_| None).ok()?;
    let quotes = |s: &str| s.matches(['\'', '"']).count();
    let expand = raw_words.len() == 1 && quotes(&words[0]) == quotes(&raw_words[0]);
    let fd = if digits.is_empty() {
        None
    } else {
        digits.parse().ok()
    };
    Some((words[0].clone(), chomp, expand, fd))
}

/// Build a node from an assembled logical line.
fn node_from_line(line: &str, escape: char, span: Span) -> Result<Node, String> {
    let trimmed = line.trim();
    let mut parts = split_ws(trimmed, 2).into_iter();
    let word = parts.next().unwrap_or_default();
    let after = parts.next().unwrap_or_default();
    let (rest, flags) = extract_flags(&after, escape);
    let rest = rest.trim().to_string();
    let keyword = word.to_lowercase();
    let mut node = Node {
        keyword: keyword.clone(),
        word,
        flags,
        args: Vec::new(),
        onbuild: None,
        json: false,
        heredocs: Vec::new(),
        original: line.to_string(),
        rest: rest.clone(),
        span,
        comments: Vec::new(),
    };
    match keyword.as_str() {
        "from" | "expose" => node.args = whitespace_args(&rest),
        "add" | "copy" | "volume" => match parse_json_array(&rest)? {
            Some(v) => (node.args, node.json) = (v, true),
            None => node.args = whitespace_args(&rest),
        },
        "run" | "cmd" | "entrypoint" | "shell" => (node.args, node.json) = maybe_json(&rest)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !rest.is_empty() {
                node.args = vec![rest.clone()];
            }
        }
        "env" | "label" => node.args = name_values(&rest, &keyword, escape)?,
        "arg" => node.args = words_of(&rest, escape),
        "healthcheck" => {
            if let Some(sep) = rest.find(char::is_whitespace) {
                let (ty, cmd) = rest.split_at(sep);
                node.args.push(ty.to_string());
                let (args, json) = maybe_json(cmd.trim_start())?;
                node.args.extend(args);
                node.json = json;
            } else if !rest.is_empty() {
                node.args.push(rest.clone());
            }
        }
        "onbuild" => {
            if !rest.is_empty() {
                node.onbuild = Some(Box::new(node_from_line(&rest, escape, span)?));
            }
        }
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

fn whitespace_args(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        Vec::new()
    } else {
        split_ws(rest, usize::MAX)
    }
}

/// JSON form when `rest` is a JSON array of strings, else the whole text as one argument.
fn maybe_json(rest: &str) -> Result<(Vec<String>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    Ok(match parse_json_array(rest)? {
        Some(v) => (v, true),
        None => (vec![rest.to_string()], false),
    })
}

/// `Some(strings)` for a JSON array of strings, `None` for anything that is not JSON, and an
/// error for a JSON array holding a non-string.
fn parse_json_array(rest: &str) -> Result<Option<Vec<String>>, String> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(rest)
    else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err("a JSON array in this instruction must hold only strings".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Flag extraction (BuildKit `extractBuilderFlags`): leading `--words`, quotes and escapes
/// removed; returns the rest of the line and the flags.
fn extract_flags(line: &str, escape: char) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut flags = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut blank_ok = false;
    let mut i = 0;
    loop {
        let at_end = i >= chars.len();
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            let (pos, ch) = chars[i];
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            if ch != '-' || chars.get(i + 1).map(|c| c.1) != Some('-') {
                return (line[pos..].to_string(), flags);
            }
            phase = Phase::Word;
        }
        if at_end {
            if word != "--" && (blank_ok || !word.is_empty()) {
                flags.push(word);
            }
            break;
        }
        let (pos, ch) = chars[i];
        match phase {
            Phase::Word => {
                if ch.is_whitespace() {
                    phase = Phase::Spaces;
                    if word == "--" {
                        return (line[pos..].to_string(), flags);
                    }
                    if blank_ok || !word.is_empty() {
                        flags.push(std::mem::take(&mut word));
                    }
                    blank_ok = false;
                } else if ch == '\'' || ch == '"' {
                    phase = Phase::Quote(ch);
                    blank_ok = true;
                } else if ch == escape {
                    if let Some(&(_, next)) = chars.get(i + 1) {
                        word.push(next);
                        i += 1;
                    }
                } else {
                    word.push(ch);
                }
            }
            Phase::Quote(q) => {
                if ch == q {
                    phase = Phase::Word;
                } else if ch == escape {
                    match chars.get(i + 1) {
                        Some(&(_, next)) => {
                            word.push(next);
                            i += 1;
                        }
                        None => phase = Phase::Word,
                    }
                } else {
                    word.push(ch);
                }
            }
            Phase::Spaces => {}
        }
        i += 1;
    }
    (String::new(), flags)
}

/// Word splitting for ENV/LABEL/ARG (BuildKit `parseWords`): quotes and escapes are kept.
pub fn words_of(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut blank_ok = false;
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if !in_word {
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            in_word = true;
        }
        match quote {
            None => {
                if ch.is_whitespace() {
                    in_word = false;
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    blank_ok = false;
                    i += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    quote = Some(ch);
                    blank_ok = true;
                }
                if ch == escape {
                    if i + 1 == chars.len() {
                        i += 1;
                        continue;
                    }
                    word.push(ch);
                    i += 1;
                }
                word.push(chars[i]);
            }
            Some(q) => {
                if ch == q {
                    quote = None;
                }
                if ch == escape && q != '\'' {
                    if i + 1 == chars.len() {
                        quote = None;
                        i += 1;
                        continue;
                    }
                    word.push(ch);
                    i += 1;
                }
                word.push(chars[i]);
            }
        }
        i += 1;
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// ENV/LABEL: legacy `KEY value` or `k=v ...`, as flattened `key, value, sep` triples.
fn name_values(rest: &str, keyword: &str, escape: char) -> Result<Vec<String>, String> {
    let words = words_of(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    let upper = keyword.to_uppercase();
    if !first.contains('=') {
        let parts = split_ws(rest, 2);
        if parts.len() < 2 {
            return Err(format!("{} must have two arguments", upper));
        }
        return Ok(vec![parts[0].clone(), parts[1].clone(), String::new()]);
    }
    let mut out = Vec::new();
    for w in &words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "syntax error - can't find = in {}. Must be of the form: name=value",
                go_quote(w)
            ));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(text: &str) -> String {
        parse("Buildfile", text)
            .map(|d| d.dump())
            .unwrap_or_else(|e| format!("ERR {}", e.message))
    }

    #[test]
    fn flags_and_double_dash() {
        assert_eq!(
            dump("COPY --doit=true -- foo /tmp/\n"),
            "(copy [\"--doit=true\"] \"foo\" \"/tmp/\")\n"
        );
        assert_eq!(dump("CMD --doit -- [ ]\n"), "(cmd [\"--doit\"])\n");
        assert_eq!(dump("COPY -- foo /tmp/\n"), "(copy \"foo\" \"/tmp/\")\n");
    }

    #[test]
    fn continuation_keeps_leading_space_of_next_line() {
        assert_eq!(
            dump("RUN make \\\n    install\n"),
            "(run \"make     install\")\n"
        );
        assert_eq!(
            dump("ENV C trailing\\\\\nRUN x\n"),
            "(env \"C\" \"trailing\\\\\\\\\" \"\")\n(run \"x\")\n"
        );
        assert_eq!(dump("RUN something \\"), "(run \"something\")\n");
    }

    #[test]
    fn heredocs_are_consumed_not_printed() {
        let d = parse(
            "Buildfile",
            "RUN <<EOF\necho hi\nEOF\nCOPY <<A <<B /dest\na\nA\nb\nB\n",
        )
        .unwrap();
        assert_eq!(
            d.dump(),
            "(run \"<<EOF\")\n(copy \"<<A\" \"<<B\" \"/dest\")\n"
        );
        assert_eq!(d.nodes[0].heredocs[0].content, "echo hi\n");
        assert_eq!(d.nodes[1].heredocs[1].name, "B");
    }

    #[test]
    fn quoted_heredoc_delimiter_disables_expansion_and_chomp_strips_tabs() {
        let d = parse("Buildfile", "RUN <<-\"EOF\"\n\techo $HOME\n\tEOF\n").unwrap();
        let h = &d.nodes[0].heredocs[0];
        assert!(!h.expand && h.chomp);
        assert_eq!(h.content, "echo $HOME\n");
    }

    #[test]
    fn unterminated_heredoc_is_an_error() {
        assert!(dump("RUN <<EOF\necho\n").starts_with("ERR unterminated heredoc"));
    }

    #[test]
    fn user_takes_no_heredoc() {
        assert_eq!(dump("USER <<X\nRUN x\n"), "(user \"<<X\")\n(run \"x\")\n");
    }

    #[test]
    fn env_forms_and_errors() {
        assert_eq!(dump("ENV a b c\n"), "(env \"a\" \"b c\" \"\")\n");
        assert_eq!(dump("ENV PATH\n"), "ERR ENV must have two arguments");
        assert!(dump("ENV a=b c\n").starts_with("ERR syntax error - can't find ="));
    }

    #[test]
    fn comments_above_an_instruction_are_kept_as_buildkit_keeps_them() {
        let doc = parse(
            "f",
            "# check=skip=all\n# one\nFROM a\n# two\n\n#three  \n  # four\nRUN x\n# gone\n#\n# five\nRUN \\\n# inside\n y\nRUN z\n",
        )
        .unwrap();
        let comments: Vec<Vec<&str>> = doc
            .nodes
            .iter()
            .map(|n| n.comments.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            comments,
            [
                vec!["one"],
                // A blank line does not end the block; an indented comment keeps its `#`.
                vec!["two", "three", "# four"],
                // A bare `#` does.
                vec!["five"],
                vec![],
            ]
        );
    }

    #[test]
    fn directives_only_at_top_and_only_once() {
        assert_eq!(dump("# escape=`\nRUN a `\n b\n"), "(run \"a  b\")\n");
        assert!(dump("# escape=x\nRUN a\n").starts_with("ERR invalid escape token"));
        assert!(dump("# syntax=a\n# syntax=b\nRUN a\n").starts_with("ERR only one syntax"));
        assert_eq!(
            dump("RUN a\n# escape=`\nRUN b \\\n c\n"),
            "(run \"a\")\n(run \"b  c\")\n"
        );
    }

    #[test]
    fn empty_files_are_errors() {
        assert!(dump("").starts_with("ERR"));
        assert!(dump("# just a comment\n\n").starts_with("ERR"));
    }

    #[test]
    fn nested_json_is_an_error_invalid_json_falls_back() {
        assert!(dump("CMD [\"a\", [\"b\"]]\n").starts_with("ERR"));
        assert_eq!(dump("RUN ['ls', '-l']\n"), "(run \"['ls', '-l']\")\n");
    }

    #[test]
    fn onbuild_and_healthcheck() {
        assert_eq!(
            dump("ONBUILD RUN [\"echo\", \"test\"]\n"),
            "(onbuild (run \"echo\" \"test\"))\n"
        );
        assert_eq!(dump("HEALTHCHECK NONE\n"), "(healthcheck \"NONE\")\n");
        assert_eq!(
            dump("HEALTHCHECK --interval=9s CMD curl -f http://x/\n"),
            "(healthcheck [\"--interval=9s\"] \"CMD\" \"curl -f http://x/\")\n"
        );
    }

    #[test]
    fn spans_cover_continuations() {
        let d = parse("Buildfile", "FROM a\n\n  RUN b \\\n   c\nRUN d\n").unwrap();
        assert_eq!(
            d.nodes[1].span,
            Span {
                line: 3,
                column: 3,
                end_line: 4
            }
        );
        assert_eq!(d.nodes[2].span.line, 5);
    }
}
