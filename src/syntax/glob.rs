//! The one glob matcher behind `.dockerignore`, COPY/ADD source globs and `${V#pattern}`.
//!
//! Each caller compiles its own syntax into [`Tok`]s (their escapes and `**` rules differ);
//! matching is a simulation of the pattern as an automaton: the set of pattern positions
//! still alive is advanced one character at a time. That costs at most
//! `len(text) * (len(pattern) + 1)` steps whatever the pattern, where a backtracking matcher
//! is exponential on `a*a*a*a*b` or `**/**/**/x*y*z`.

/// One pattern element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    Lit(char),
    /// One character (`?`); `slash` says whether it may be `/`.
    One {
        slash: bool,
    },
    /// Any run of characters (`*`); `slash` says whether it may contain `/`.
    Star {
        slash: bool,
    },
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// Consumes nothing; the match may go on at the next element or skip the `n` after it
    /// (how `**/`, "any run of whole directories, possibly none", is written).
    Skip(usize),
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Glob {
    toks: Vec<Tok>,
}

impl Glob {
    pub fn new(toks: Vec<Tok>) -> Glob {
        Glob { toks }
    }

    /// `**/`: an optional run of characters that ends with `/`.
    pub fn dirs() -> [Tok; 3] {
        [Tok::Skip(2), Tok::Star { slash: true }, Tok::Lit('/')]
    }

    /// Whether all of `s` matches.
    pub fn matches(&self, s: &[char]) -> bool {
        self.run(s, |_, _| {}).0
    }

    /// Whether all of `s` matches, and how many automaton steps that took.
    pub fn match_cost(&self, s: &[char]) -> (bool, u64) {
        self.run(s, |_, _| {})
    }

    /// For each prefix length `0..=s.len()`, whether that prefix matches (one pass).
    pub fn prefix_matches(&self, s: &[char]) -> Vec<bool> {
        let mut out = vec![false; s.len() + 1];
        self.run(s, |len, accepting| out[len] = accepting);
        out
    }

    /// The pattern read backwards (for suffix matching on reversed text). A `Skip(n)` keeps
    /// guarding the same `n` elements, now in reverse order.
    pub fn reversed(&self) -> Glob {
        let mut units: Vec<Vec<Tok>> = Vec::new();
        let mut i = 0;
        while i < self.toks.len() {
            if let Tok::Skip(n) = self.toks[i] {
                let end = (i + 1 + n).min(self.toks.len());
                let mut group = vec![Tok::Skip(end - i - 1)];
                group.extend(self.toks[i + 1..end].iter().rev().cloned());
                units.push(group);
                i = end;
            } else {
                units.push(vec![self.toks[i].clone()]);
                i += 1;
            }
        }
        units.reverse();
        Glob {
            toks: units.concat(),
        }
    }

    /// Add `state` and everything reachable from it without consuming a character (`stack`
    /// is scratch space, kept between calls).
    fn close(&self, set: &mut [bool], state: usize, stack: &mut Vec<usize>) {
        stack.clear();
        stack.push(state);
        while let Some(i) = stack.pop() {
            if set[i] {
                continue;
            }
            set[i] = true;
            match self.toks.get(i) {
                Some(Tok::Star { .. }) => stack.push(i + 1),
                Some(Tok::Skip(n)) => {
                    stack.push(i + 1);
                    stack.push((i + 1 + n).min(self.toks.len()));
                }
                _ => {}
            }
        }
    }

    /// Simulate over `s`, telling `seen(len, accepting)` after each prefix; returns whether
    /// the whole matched and the step count. Two state sets are reused throughout: nothing is
    /// allocated per character.
    fn run(&self, s: &[char], mut seen: impl FnMut(usize, bool)) -> (bool, u64) {
        let m = self.toks.len();
        let mut cur = vec![false; m + 1];
        let mut next = vec![false; m + 1];
        let mut stack = Vec::with_capacity(m + 2);
        self.close(&mut cur, 0, &mut stack);
        let mut steps = 0u64;
        seen(0, cur[m]);
        for (pos, &c) in s.iter().enumerate() {
            next.iter_mut().for_each(|b| *b = false);
            let mut any = false;
            for (i, tok) in self.toks.iter().enumerate() {
                if !cur[i] {
                    continue;
                }
                steps += 1;
                let to = match tok {
                    Tok::Lit(x) => (*x == c).then_some(i + 1),
                    Tok::One { slash } => (*slash || c != '/').then_some(i + 1),
                    Tok::Star { slash } => (*slash || c != '/').then_some(i),
                    Tok::Class { negated, ranges } => {
                        let inside = ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi);
                        (inside != *negated).then_some(i + 1)
                    }
                    Tok::Skip(_) => None,
                };
                if let Some(t) = to {
                    self.close(&mut next, t, &mut stack);
                    any = true;
                }
            }
            std::mem::swap(&mut cur, &mut next);
            seen(pos + 1, cur[m]);
            if !any {
                for len in pos + 2..=s.len() {
                    seen(len, false);
                }
                return (false, steps);
            }
        }
        (cur[m], steps)
    }
}

/// A `[...]` class starting after the `[` at `i`; `[^` negates, `[!` does not.
pub fn parse_class(chars: &[char], mut i: usize) -> Result<(Tok, usize), String> {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        match chars.get(i) {
            Some(']') if !ranges.is_empty() => return Ok((Tok::Class { negated, ranges }, i + 1)),
            None => return Err("unterminated character class".into()),
            _ => {}
        }
        let (lo, n) = class_char(chars, i)?;
        i = n;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            let (h, n) = class_char(chars, i + 1)?;
            hi = h;
            i = n;
        }
        if hi < lo {
            return Err(format!("invalid character class range {}-{}", lo, hi));
        }
        ranges.push((lo, hi));
    }
}

fn class_char(chars: &[char], mut i: usize) -> Result<(char, usize), String> {
    match chars.get(i) {
        None | Some('-') | Some(']') => return Err("bad character class".into()),
        Some('\\') => i += 1,
        _ => {}
    }
    let c = *chars.get(i).ok_or("bad character class")?;
    if i + 1 >= chars.len() {
        return Err("unterminated character class".into());
    }
    Ok((c, i + 1))
}

/// Compile one path segment's pattern as Go's `filepath.Match` reads it (`*` and `?` never
/// match `/`, `\\` escapes, `[...]` classes); `None` for a malformed pattern.
pub fn segment(pattern: &str) -> Option<Glob> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => toks.push(Tok::Star { slash: false }),
            '?' => toks.push(Tok::One { slash: false }),
            '\\' => {
                toks.push(Tok::Lit(*chars.get(i)?));
                i += 1;
            }
            '[' => {
                let (tok, next) = parse_class(&chars, i).ok()?;
                toks.push(tok);
                i = next;
            }
            c => toks.push(Tok::Lit(c)),
        }
    }
    Some(Glob::new(toks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn star() -> Tok {
        Tok::Star { slash: false }
    }

    fn lits(s: &str) -> Vec<Tok> {
        s.chars().map(Tok::Lit).collect()
    }

    #[test]
    fn stars_questions_classes() {
        let mut t = lits("a");
        t.push(star());
        t.extend(lits("b"));
        let g = Glob::new(t);
        let c = |s: &str| s.chars().collect::<Vec<_>>();
        assert!(g.matches(&c("ab")) && g.matches(&c("axxb")));
        assert!(!g.matches(&c("a/b")) && !g.matches(&c("abc")));
        let g = Glob::new(vec![Tok::Class {
            negated: true,
            ranges: vec![('a', 'c')],
        }]);
        assert!(g.matches(&c("d")) && !g.matches(&c("b")));
    }

    #[test]
    fn double_star_dirs_match_zero_or_more_directories() {
        let mut t: Vec<Tok> = Glob::dirs().to_vec();
        t.extend(lits("x"));
        let g = Glob::new(t);
        let c = |s: &str| s.chars().collect::<Vec<_>>();
        assert!(g.matches(&c("x")) && g.matches(&c("a/x")) && g.matches(&c("a/b/x")));
        assert!(!g.matches(&c("ax")) && !g.matches(&c("a/bx")));
        let r = g.reversed();
        assert!(r.matches(&c("x")) && r.matches(&c("x/a")) && !r.matches(&c("xa")));
    }

    #[test]
    fn pathological_patterns_cost_at_most_text_times_pattern() {
        // a*a*a*a*a*a*a*a*a*b against 185 a's: exponential for backtracking.
        let mut t = Vec::new();
        for _ in 0..9 {
            t.push(Tok::Lit('a'));
            t.push(star());
        }
        t.push(Tok::Lit('b'));
        let g = Glob::new(t);
        let text: Vec<char> = "a".repeat(185).chars().collect();
        let (m, steps) = g.match_cost(&text);
        assert!(!m);
        assert!(steps <= 185 * 20, "{steps} steps");
    }

    #[test]
    fn prefixes_in_one_pass() {
        let mut t = lits("a");
        t.push(Tok::Star { slash: true });
        let g = Glob::new(t);
        let s: Vec<char> = "xab".chars().collect();
        assert_eq!(g.prefix_matches(&s), vec![false, false, false, false]);
        let s: Vec<char> = "abc".chars().collect();
        assert_eq!(g.prefix_matches(&s), vec![false, true, true, true]);
    }
}
