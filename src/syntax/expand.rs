//! Word expansion as BuildKit's shell lexer does it: quotes, escapes, `$VAR`/`${VAR}` with
//! the `:-` `-` `:+` `+` `:?` `?` `#` `##` `%` `%%` `/` `//` modifiers, and word splitting.
//! Used for the instructions Docker expands (FROM, COPY, ADD, ENV, LABEL, ARG, WORKDIR, USER,
//! EXPOSE, VOLUME, STOPSIGNAL and their flags) and for finding heredoc words.

use super::glob::{Glob, Tok};

/// How the lexer treats quotes, escapes and unset variables.
#[derive(Debug, Clone, Copy, Default)]
pub struct LexOptions {
    /// Keep quote characters in the result.
    pub raw_quotes: bool,
    /// Keep escape characters in the result.
    pub raw_escapes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset: bool,
}

/// An expansion failure (bad substitution, unterminated quote, `${X:?}` on an unset X...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandError(pub String);

impl std::fmt::Display for ExpandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ExpandError {}

/// The shell-word lexer for one escape character.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    escape: char,
    options: LexOptions,
}

/// Variable lookup: `None` means unset.
pub type Lookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

impl Lexer {
    pub fn new(escape: char, options: LexOptions) -> Self {
        Lexer { escape, options }
    }

    /// Process `input` as one word (no splitting).
    pub fn word(&self, input: &str, env: &Lookup) -> Result<String, ExpandError> {
        self.run(input, env).map(|(w, _)| w)
    }

    /// Process `input` into words split at unquoted whitespace.
    pub fn words(&self, input: &str, env: &Lookup) -> Result<Vec<String>, ExpandError> {
        self.run(input, env).map(|(_, ws)| ws)
    }

    fn run(&self, input: &str, env: &Lookup) -> Result<(String, Vec<String>), ExpandError> {
        let mut sw = ShellWord {
            chars: input.chars().collect(),
            pos: 0,
            escape: self.escape,
            opts: self.options,
            raw_escapes: self.options.raw_escapes,
            env,
            depth: 0,
        };
        sw.stop_on(None, self.options.raw_escapes).map_err(|e| {
            ExpandError(format!(
                "failed to process \"{}\": {}",
                super::error::abbreviate(input, 120),
                e.0
            ))
        })
    }
}

#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }
    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }
    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

struct ShellWord<'a, 'e> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    opts: LexOptions,
    raw_escapes: bool,
    env: &'a Lookup<'e>,
    /// How many `${...}` words are open: bounded, so input cannot exhaust the stack.
    depth: usize,
}

/// The deepest nesting of `${VAR:-${...}}` words accepted (BuildKit's own stack allows a few
/// thousand; nothing real needs more than a handful).
pub const MAX_NESTING: usize = 64;

/// The longest a word may grow by expansion (BuildKit has no bound; a value doubled a few dozen
/// times would otherwise take all memory). Real values, certificates included, are far shorter.
pub const MAX_WORD_BYTES: usize = 1 << 20;

/// `${VAR/pattern/repl}` tries the pattern at every position of the value: this bounds the
/// characters it may look at in all, so that a long value cannot make it run for hours.
const MAX_REPLACE_WORK: usize = 1 << 28;

fn too_long<T>() -> Result<T, ExpandError> {
    err(format!(
        "the expanded word is longer than {} bytes (the limit of one expanded word)",
        MAX_WORD_BYTES
    ))
}

fn err<T>(m: impl Into<String>) -> Result<T, ExpandError> {
    Err(ExpandError(m.into()))
}

impl ShellWord<'_, '_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), ExpandError> {
        if self.depth >= MAX_NESTING {
            return err(format!(
                "substitutions nested more than {} deep",
                MAX_NESTING
            ));
        }
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        self.depth += 1;
        let r = self.stop_on_inner(stop);
        self.depth -= 1;
        self.raw_escapes = saved;
        r
    }

    fn stop_on_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), ExpandError> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if result.len() > MAX_WORD_BYTES {
                return too_long();
            }
            if Some(ch) == stop {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match ch {
                '$' => {
                    let v = self.dollar()?;
                    result.push_str(&v);
                    if result.len() > MAX_WORD_BYTES {
                        return too_long();
                    }
                    words.add_string(&v);
                }
                '\'' => {
                    let v = self.single_quote()?;
                    result.push_str(&v);
                    words.add_raw_string(&v);
                }
                '"' => {
                    let v = self.double_quote()?;
                    result.push_str(&v);
                    words.add_raw_string(&v);
                }
                _ => {
                    self.pos += 1;
                    if ch == self.escape {
                        if self.raw_escapes {
                            words.add_raw_char(ch);
                            result.push(ch);
                        }
                        let Some(next) = self.next() else { break };
                        words.add_raw_char(next);
                        result.push(next);
                    } else {
                        words.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        if let Some(s) = stop {
            return err(format!(
                "unexpected end of statement while looking for matching {}",
                s
            ));
        }
        if result.len() > MAX_WORD_BYTES {
            return too_long();
        }
        Ok((result, words.finish()))
    }

    fn single_quote(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        let open = self.next();
        if self.opts.raw_quotes {
            out.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return err(
                        "unexpected end of statement while looking for matching single-quote",
                    )
                }
                Some('\'') => {
                    if self.opts.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        let open = self.next();
        if self.opts.raw_quotes {
            out.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return err(
                        "unexpected end of statement while looking for matching double-quote",
                    )
                }
                Some('"') => {
                    self.pos += 1;
                    if self.opts.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                    if out.len() > MAX_WORD_BYTES {
                        return too_long();
                    }
                }
                Some(mut ch) => {
                    self.pos += 1;
                    if ch == self.escape {
                        if self.raw_escapes {
                            out.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                ch = n;
                            }
                            Some(_) => {
                                if self.raw_escapes {
                                    continue;
                                }
                            }
                        }
                    }
                    out.push(ch);
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_numeric() {
                while let Some(d) = self.peek().filter(|c| c.is_numeric()) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return ch.to_string();
            }
            if !ch.is_alphabetic() && !ch.is_numeric() && ch != '_' {
                break;
            }
            name.push(ch);
            self.pos += 1;
        }
        name
    }

    fn dollar(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match (self.env)(&name) {
                Some(v) => v,
                None if self.opts.skip_unset => format!("${}", name),
                None => String::new(),
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return err("syntax error: missing '}'"),
            Some('{' | '}' | ':') => return err("syntax error: bad substitution"),
            _ => {}
        }
        let name = self.name();
        let Some(mut ch) = self.next() else {
            return err("syntax error: missing '}'");
        };
        let mut modifier = ch.to_string();
        let value = (self.env)(&name);
        match ch {
            '}' => Ok(match value {
                Some(v) => v,
                None if self.opts.skip_unset => format!("${{{}}}", name),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let null_is_unset = ch == ':';
                if null_is_unset {
                    let Some(c) = self.next() else {
                        return err("syntax error: missing '}'");
                    };
                    ch = c;
                    modifier.push(c);
                }
                let raw = ch == '#' || ch == '%';
                let word = match self.stop_on(Some('}'), raw) {
                    Ok((w, _)) => w,
                    Err(_) if self.peek().is_none() => return err("syntax error: missing '}'"),
                    Err(e) => return Err(e),
                };
                if self.opts.skip_unset && value.is_none() {
                    return Ok(format!("${{{}{}{}}}", name, modifier, word));
                }
                let unset = value.is_none() || (null_is_unset && value.as_deref() == Some(""));
                match ch {
                    '-' => Ok(if unset {
                        word
                    } else {
                        value.unwrap_or_default()
                    }),
                    '+' => Ok(if unset { String::new() } else { word }),
                    '?' => {
                        if value.is_none() {
                            let m = if word.is_empty() {
                                "is not allowed to be unset".into()
                            } else {
                                word
                            };
                            return err(format!("{}: {}", name, m));
                        }
                        if unset {
                            let m = if word.is_empty() {
                                "is not allowed to be empty".into()
                            } else {
                                word
                            };
                            return err(format!("{}: {}", name, m));
                        }
                        Ok(value.unwrap_or_default())
                    }
                    '#' | '%' => {
                        let (greedy, pat) = match word.strip_prefix(ch) {
                            Some(p) => (true, p.to_string()),
                            None => (false, word),
                        };
                        let pattern = Pattern::compile(&pat)?;
                        let v = value.unwrap_or_default();
                        Ok(if ch == '#' {
                            pattern.trim_prefix(&v, greedy)
                        } else {
                            pattern.trim_suffix(&v, greedy)
                        })
                    }
                    _ => err(format!(
                        "unsupported modifier ({}) in substitution",
                        modifier
                    )),
                }
            }
            '/' => {
                let all = self.peek() == Some('/');
                if all {
                    self.pos += 1;
                }
                let pat = match self.stop_on(Some('/'), true) {
                    Ok((w, _)) => w,
                    Err(_) if self.peek().is_none() => {
                        return err("syntax error: missing '/' in ${}")
                    }
                    Err(e) => return Err(e),
                };
                let repl = match self.stop_on(Some('}'), true) {
                    Ok((w, _)) => w,
                    Err(_) if self.peek().is_none() => return err("syntax error: missing '}'"),
                    Err(e) => return Err(e),
                };
                if self.opts.skip_unset && value.is_none() {
                    return Ok(format!("${{{}/{}/{}}}", name, pat, repl));
                }
                let pattern = Pattern::compile(&pat)?;
                pattern.replace(&value.unwrap_or_default(), &repl, all)
            }
            _ => err(format!(
                "unsupported modifier ({}) in substitution",
                modifier
            )),
        }
    }
}

/// The longest (`greedy`) or shortest matching prefix length among `hits`.
fn pick(hits: &[bool], greedy: bool) -> Option<usize> {
    if greedy {
        hits.iter().rposition(|h| *h)
    } else {
        hits.iter().position(|h| *h)
    }
}

/// A shell pattern of `${VAR#pattern}` and friends: `*`, `?` and `\`-escaped literals,
/// matched by the one linear-time matcher ([`Glob`]).
#[derive(Debug)]
struct Pattern(Glob);

impl Pattern {
    fn compile(p: &str) -> Result<Pattern, ExpandError> {
        let chars: Vec<char> = p.chars().collect();
        let mut toks = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => toks.push(Tok::Star { slash: true }),
                '?' => toks.push(Tok::One { slash: true }),
                '\\' => match chars.get(i + 1) {
                    Some('}' | '/') => {}
                    Some(&c @ ('*' | '?' | '\\')) => {
                        toks.push(Tok::Lit(c));
                        i += 1;
                    }
                    Some(c) => {
                        return err(format!(
                            "invalid pattern ({}) in substitution: invalid escape '\\{}'",
                            p, c
                        ))
                    }
                    None => {
                        return err(format!(
                            "invalid pattern ({}) in substitution: trailing backslash",
                            p
                        ))
                    }
                },
                c => toks.push(Tok::Lit(c)),
            }
            i += 1;
        }
        Ok(Pattern(Glob::new(toks)))
    }

    fn trim_prefix(&self, v: &str, greedy: bool) -> String {
        let chars: Vec<char> = v.chars().collect();
        match pick(&self.0.prefix_matches(&chars), greedy) {
            Some(n) => chars[n..].iter().collect(),
            None => v.to_string(),
        }
    }

    fn trim_suffix(&self, v: &str, greedy: bool) -> String {
        // Suffixes of v are prefixes of v reversed, matched by the pattern reversed.
        let mut rev: Vec<char> = v.chars().collect();
        rev.reverse();
        match pick(&self.0.reversed().prefix_matches(&rev), greedy) {
            Some(n) => rev[n..].iter().rev().collect(),
            None => v.to_string(),
        }
    }

    /// The end of the longest match starting at `start`, if any.
    fn match_at(&self, chars: &[char], start: usize) -> Option<usize> {
        self.0
            .prefix_matches(&chars[start..])
            .iter()
            .rposition(|h| *h)
            .map(|n| start + n)
    }

    fn replace(&self, v: &str, repl: &str, all: bool) -> Result<String, ExpandError> {
        let chars: Vec<char> = v.chars().collect();
        let mut out = String::new();
        let mut i = 0;
        let mut last_match_end: Option<usize> = None;
        let mut work = 0usize;
        while i <= chars.len() {
            work += chars.len() - i + 1;
            if work > MAX_REPLACE_WORK {
                return err(format!(
                    "a pattern substitution on a value of {} characters is too costly (at most {} character comparisons)",
                    chars.len(),
                    MAX_REPLACE_WORK
                ));
            }
            if out.len() > MAX_WORD_BYTES {
                return too_long();
            }
            match self.match_at(&chars, i) {
                Some(end) if !(end == i && last_match_end == Some(i)) => {
                    out.push_str(repl);
                    last_match_end = Some(end);
                    if !all {
                        out.extend(&chars[end..]);
                        return Ok(out);
                    }
                    if end > i {
                        i = end;
                        continue;
                    }
                    if let Some(c) = chars.get(i) {
                        out.push(*c);
                    }
                    i += 1;
                }
                _ => {
                    if let Some(c) = chars.get(i) {
                        out.push(*c);
                    }
                    i += 1;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PWD" => Some("/home".into()),
            "NULL" => Some(String::new()),
            "P" => Some("foo/bar/baz.tar.gz".into()),
            "S" => Some("a  b".into()),
            _ => None,
        }
    }
    fn w(s: &str) -> Result<String, ExpandError> {
        Lexer::new('\\', LexOptions::default()).word(s, &env)
    }

    #[test]
    fn defaults_and_alternatives() {
        assert_eq!(w("he${XXX:-000}xx").unwrap(), "he000xx");
        assert_eq!(w("${NULL-x}|${NULL:-x}").unwrap(), "|x");
        assert_eq!(w("${PWD:+set}${XXX+set}").unwrap(), "set");
        assert!(w("he${NULL:?}").is_err());
        assert_eq!(w("${NULL?}").unwrap(), "");
    }

    #[test]
    fn prefix_suffix_and_replace() {
        assert_eq!(w("${P#*/}").unwrap(), "bar/baz.tar.gz");
        assert_eq!(w("${P##*/}").unwrap(), "baz.tar.gz");
        assert_eq!(w("${P%.*}").unwrap(), "foo/bar/baz.tar");
        assert_eq!(w("${P%%.*}").unwrap(), "foo/bar/baz");
        assert_eq!(w("${P/a/A}").unwrap(), "foo/bAr/baz.tar.gz");
        assert_eq!(w("${P//a/A}").unwrap(), "foo/bAr/bAz.tAr.gz");
        assert_eq!(w("${P/\\/b/_}").unwrap(), "foo_ar/baz.tar.gz");
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(w("\"he'$PWD'\"").unwrap(), "he'/home'");
        assert_eq!(w("he\\$PWD").unwrap(), "he$PWD");
        assert_eq!(w("'$PWD'").unwrap(), "$PWD");
        assert_eq!(w("\"abc\\tdef\"").unwrap(), "abc\\tdef");
        assert!(w("\"open").is_err());
        assert_eq!(w("${999:-bbb}aaa").unwrap(), "bbbaaa");
    }

    #[test]
    fn unquoted_expansion_splits_quoted_does_not() {
        let l = Lexer::new('\\', LexOptions::default());
        assert_eq!(l.words("x${S}y", &env).unwrap(), vec!["xa", "by"]);
        assert_eq!(l.words("x\"${S}\"y", &env).unwrap(), vec!["xa  by"]);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}x{}", "${a:-".repeat(3000), "}".repeat(3000));
        let e = w(&deep).unwrap_err();
        assert!(e.to_string().contains("nested more than"), "{e}");
        let ok = format!("{}x{}", "${a:-".repeat(20), "}".repeat(20));
        assert_eq!(w(&ok).unwrap(), "x");
        let quoted = format!("{}x{}", "\"${a:-".repeat(3000), "}\"".repeat(3000));
        assert!(w(&quoted).is_err());
    }

    #[test]
    fn bad_substitutions() {
        for bad in ["${}", "${:}", "${X:=y}", "${X:y}", "${X", "${P/x}"] {
            assert!(w(bad).is_err(), "{bad}");
        }
    }
}
