//! `.dockerignore` with Docker's semantics (moby `patternmatcher` and `ignorefile`), not
//! .gitignore's: patterns are anchored at the context root, cleaned lexically, `**` crosses
//! directories, a pattern that matches a parent matches everything below it, `!` re-includes,
//! and the last matching pattern decides.

use std::path::Path;

use super::glob::{parse_class, Glob, Tok};

/// An invalid pattern list, naming the offending pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoreError(pub String);

impl std::fmt::Display for IgnoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for IgnoreError {}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MatchType {
    Exact,
    Prefix,
    Suffix,
    Glob,
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    kind: MatchType,
    glob: Glob,
}

/// A compiled `.dockerignore`.
///
/// A path is matched in one pass per wildcard pattern, whatever its depth: each pattern's
/// automaton runs over the whole path once and says at once which of its leading directories
/// it matches too. Literal patterns (most of a long file) are found by hashing, not tried one
/// by one.
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    /// Shared by every clone (each step that reads the context holds one).
    compiled: std::sync::Arc<Compiled>,
}

#[derive(Debug, Default)]
struct Compiled {
    patterns: Vec<Pattern>,
    /// Indices of the literal patterns, by their text.
    exact: std::collections::HashMap<String, Vec<usize>>,
    /// Indices of every other pattern, in order.
    others: Vec<usize>,
    /// The `!` patterns' text, less a trailing `/**` or `/*`, with a `/` after it (what may
    /// re-include below a directory).
    reincludes: Vec<String>,
    /// Some `!` pattern has a wildcard before its end: any excluded directory may hold
    /// something it re-includes.
    exceptions_have_wildcards: bool,
}

/// The largest `.dockerignore` read: real ones are a few KiB, generated ones a few hundred.
pub const MAX_IGNORE_BYTES: u64 = 4 << 20;

/// The most patterns one ignore list may hold (each costs memory for the build's length).
pub const MAX_PATTERNS: usize = 100_000;

/// The most wildcard patterns one ignore list may hold: each is tried on every path.
pub const MAX_WILDCARD_PATTERNS: usize = 10_000;

/// Go's `filepath.Clean` for `/`-separated paths.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{}", joined),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// Read the lines of a `.dockerignore` file into patterns, as `ignorefile.ReadAll` does.
pub fn read_patterns(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = if i == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut p = String::new();
        if !pattern.is_empty() {
            p = clean_path(pattern);
            if p.len() > 1 && p.starts_with('/') {
                p.remove(0);
            }
        }
        out.push(if invert { format!("!{}", p) } else { p });
    }
    out
}

impl IgnoreMatcher {
    /// Parse the text of a `.dockerignore` file.
    pub fn from_file_text(text: &str) -> Result<Self, IgnoreError> {
        Self::new(&read_patterns(text))
    }

    /// Compile already-read patterns.
    pub fn new(patterns: &[String]) -> Result<Self, IgnoreError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(IgnoreError(format!(
                "{} patterns, over the limit of {}",
                patterns.len(),
                MAX_PATTERNS
            )));
        }
        let mut out = Vec::new();
        for raw in patterns {
            let p = raw.trim();
            if p.is_empty() {
                continue;
            }
            let mut p = clean_path(p);
            let exclusion = p.starts_with('!');
            if exclusion {
                if p.len() == 1 {
                    return Err(IgnoreError("illegal exclusion pattern: \"!\"".into()));
                }
                p.remove(0);
            }
            let (kind, glob) = compile(&p)
                .map_err(|e| IgnoreError(format!("invalid pattern {:?}: {}", raw, e)))?;
            out.push(Pattern {
                cleaned: p,
                exclusion,
                kind,
                glob,
            });
        }
        let mut m = Compiled {
            patterns: Vec::new(),
            exact: Default::default(),
            others: Vec::new(),
            reincludes: Vec::new(),
            exceptions_have_wildcards: false,
        };
        for (i, p) in out.iter().enumerate() {
            match p.kind {
                MatchType::Exact => m.exact.entry(p.cleaned.clone()).or_default().push(i),
                _ => m.others.push(i),
            }
            if p.exclusion {
                // As fsutil's filterFS: a trailing `/**` or `/*` does not stop the walk from
                // entering the directory before it; any other wildcard in an exception means
                // every excluded directory is entered.
                let stem = p.cleaned.strip_suffix("/**").unwrap_or(&p.cleaned);
                let stem = stem.strip_suffix("/*").unwrap_or(stem);
                if stem.contains(['*', '[', ']', '?', '^', '\\']) {
                    m.exceptions_have_wildcards = true;
                }
                m.reincludes.push(format!("{}/", stem));
            }
        }
        if m.others.len() > MAX_WILDCARD_PATTERNS {
            return Err(IgnoreError(format!(
                "{} wildcard patterns, over the limit of {}",
                m.others.len(),
                MAX_WILDCARD_PATTERNS
            )));
        }
        m.patterns = out;
        Ok(IgnoreMatcher {
            compiled: std::sync::Arc::new(m),
        })
    }

    /// The patterns, cleaned, as [`IgnoreMatcher::new`] takes them again.
    pub fn patterns(&self) -> Vec<String> {
        self.compiled
            .patterns
            .iter()
            .map(|p| format!("{}{}", if p.exclusion { "!" } else { "" }, p.cleaned))
            .collect()
    }

    /// True when there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.compiled.patterns.is_empty()
    }

    /// Whether the context walker (fsutil's filterFS) enters the excluded directory `dir`:
    /// when an exception's text names something below it, or when some exception has a
    /// wildcard (then no excluded directory is skipped).
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        self.compiled.exceptions_have_wildcards
            || self.compiled.reincludes.iter().any(|r| {
                r.len() > dir.len() && r.starts_with(dir) && r.as_bytes()[dir.len()] == b'/'
            })
    }

    /// Every pattern that matches `path` or a directory above it, as (pattern index, the
    /// fewest leading components of `path` it matches), sorted by index. `ends` are the byte
    /// lengths of those leading parts, the last one `path` itself.
    fn hits(&self, path: &str, ends: &[usize]) -> Vec<(usize, usize)> {
        let mut first: Vec<(usize, usize)> = Vec::new();
        for (k, &end) in ends.iter().enumerate() {
            if let Some(v) = self.compiled.exact.get(&path[..end]) {
                first.extend(v.iter().map(|&i| (i, k)));
            }
        }
        // The characters of `path`, and how many of them each leading part has.
        let mut chars: Vec<char> = Vec::new();
        let mut char_ends: Vec<usize> = Vec::new();
        for &i in &self.compiled.others {
            let p = &self.compiled.patterns[i];
            let k = match p.kind {
                MatchType::Exact => None,
                MatchType::Prefix => {
                    let pre = &p.cleaned[..p.cleaned.len() - 2];
                    if path.starts_with(pre) {
                        ends.iter().position(|&e| e >= pre.len())
                    } else {
                        None
                    }
                }
                MatchType::Suffix => ends.iter().position(|&e| p.matches(&path[..e])),
                MatchType::Glob => {
                    if chars.is_empty() {
                        let mut n = 0;
                        let mut e = ends.iter().peekable();
                        for (b, c) in path.char_indices() {
                            while e.next_if(|&&end| end == b).is_some() {
                                char_ends.push(n);
                            }
                            chars.push(c);
                            n += 1;
                        }
                        for _ in e {
                            char_ends.push(n);
                        }
                    }
                    let accepted = p.glob.prefix_matches(&chars);
                    char_ends.iter().position(|&n| accepted[n])
                }
            };
            if let Some(k) = k {
                first.push((i, k));
            }
        }
        first.sort_unstable();
        first.dedup_by_key(|(i, _)| *i);
        first
    }

    /// Whether the patterns in `hits` that match within the first `depth` components leave
    /// that part excluded: the last one that matches decides.
    fn decide(&self, hits: &[(usize, usize)], depth: usize) -> bool {
        let mut matched = false;
        for &(i, k) in hits {
            let p = &self.compiled.patterns[i];
            if k <= depth && p.exclusion == matched {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// The byte length of each leading part of `path` (each directory above it, then itself).
    fn ends(path: &str) -> Vec<usize> {
        let mut ends: Vec<usize> = path.match_indices('/').map(|(i, _)| i).collect();
        ends.push(path.len());
        ends
    }

    /// Whether `path` is left out of the context as docker's walker leaves it out: an excluded
    /// file is; an excluded directory is unless an exception may re-include something below
    /// it; and everything below a directory the walker skipped is.
    pub fn is_walked_out(&self, path: &str, is_dir: bool) -> bool {
        if self.compiled.patterns.is_empty() {
            return false;
        }
        let ends = Self::ends(path);
        let hits = self.hits(path, &ends);
        if hits.is_empty() {
            return false;
        }
        let last = ends.len() - 1;
        for (k, &end) in ends[..last].iter().enumerate() {
            if self.decide(&hits, k) && !self.may_reinclude_below(&path[..end]) {
                return true;
            }
        }
        self.decide(&hits, last) && !(is_dir && self.may_reinclude_below(path))
    }

    /// Whether `path` (context-relative, `/`-separated) is excluded: the last pattern that
    /// matches it or one of its parent directories decides.
    pub fn is_ignored(&self, path: &str) -> bool {
        if self.compiled.patterns.is_empty() {
            return false;
        }
        let ends = Self::ends(path);
        let hits = self.hits(path, &ends);
        self.decide(&hits, ends.len() - 1)
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match self.kind {
            MatchType::Exact => path == self.cleaned,
            MatchType::Prefix => path.starts_with(&self.cleaned[..self.cleaned.len() - 2]),
            MatchType::Suffix => {
                let suffix = &self.cleaned[2..];
                path.ends_with(suffix) || (suffix.starts_with('/') && path == &suffix[1..])
            }
            MatchType::Glob => {
                let chars: Vec<char> = path.chars().collect();
                self.glob.matches(&chars)
            }
        }
    }
}

/// Compile a cleaned pattern the way patternmatcher does, keeping its match-type shortcuts
/// (they change results, e.g. a leading `**` makes the rest a plain suffix).
fn compile(p: &str) -> Result<(MatchType, Glob), String> {
    let chars: Vec<char> = p.chars().collect();
    let mut toks = Vec::new();
    let mut kind = MatchType::Exact;
    let mut i = 0;
    let mut step = 0;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        match ch {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    if kind == MatchType::Exact {
                        kind = MatchType::Prefix;
                    } else {
                        kind = MatchType::Glob;
                    }
                    toks.push(Tok::Star { slash: true });
                } else {
                    toks.extend(Glob::dirs());
                    kind = MatchType::Glob;
                }
                if step == 0 {
                    kind = MatchType::Suffix;
                }
            }
            '*' => {
                toks.push(Tok::Star { slash: false });
                kind = MatchType::Glob;
            }
            '?' => {
                toks.push(Tok::One { slash: false });
                kind = MatchType::Glob;
            }
            '\\' => match chars.get(i) {
                Some(&c) => {
                    toks.push(Tok::Lit(c));
                    i += 1;
                    kind = MatchType::Glob;
                }
                None => return Err("trailing backslash".into()),
            },
            '[' => {
                let (tok, next) = parse_class(&chars, i)?;
                toks.push(tok);
                i = next;
                kind = MatchType::Glob;
            }
            c => toks.push(Tok::Lit(c)),
        }
        step += 1;
    }
    Ok((kind, Glob::new(toks)))
}

/// The ignore file for a build: `<buildfile>.dockerignore` beside the build file wins over the
/// context's `.dockerignore`. Returns the file used, if any, and its matcher.
pub fn load_for_build(
    build_file: &Path,
    context: &Path,
) -> Result<(Option<std::path::PathBuf>, IgnoreMatcher), IgnoreError> {
    let mut candidates = Vec::new();
    if let Some(name) = build_file.file_name() {
        let mut n = name.to_os_string();
        n.push(".dockerignore");
        candidates.push(build_file.with_file_name(n));
    }
    candidates.push(context.join(".dockerignore"));
    for c in candidates {
        match std::fs::metadata(&c) {
            Ok(md) if md.len() > MAX_IGNORE_BYTES => {
                return Err(IgnoreError(format!(
                    "{}: {} bytes, over the limit of {} bytes for an ignore file",
                    c.display(),
                    md.len(),
                    MAX_IGNORE_BYTES
                )))
            }
            _ => {}
        }
        match std::fs::read(&c) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let m = IgnoreMatcher::from_file_text(&text)
                    .map_err(|e| IgnoreError(format!("{}: {}", c.display(), e)))?;
                return Ok((Some(c), m));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(IgnoreError(format!("{}: {}", c.display(), e))),
        }
    }
    Ok((None, IgnoreMatcher::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignored(patterns: &[&str], path: &str) -> bool {
        let text = patterns.join("\n");
        IgnoreMatcher::from_file_text(&text)
            .unwrap()
            .is_ignored(path)
    }

    #[test]
    fn anchored_and_parent_matching() {
        assert!(ignored(&["*.go"], "main.go"));
        assert!(!ignored(&["*.go"], "cmd/main.go"));
        assert!(ignored(&["docs"], "docs/a/b.txt"));
        assert!(!ignored(&["docs"], "src/docs"));
    }

    #[test]
    fn double_star_forms() {
        assert!(ignored(&["**/*.go"], "main.go"));
        assert!(ignored(&["dir/**"], "dir/a/b"));
        assert!(!ignored(&["dir/**"], "dir"));
        assert!(!ignored(&["**/node_modules"], "web/my_node_modules"));
        assert!(ignored(&["**/build/**/*.o"], "a/build/x/y/z.o"));
    }

    #[test]
    fn last_match_wins_with_exceptions() {
        assert!(!ignored(&["*.md", "!README.md"], "README.md"));
        assert!(ignored(&["*.md", "!README.md", "README*"], "README.md"));
    }

    #[test]
    fn classes_and_errors() {
        assert!(ignored(&["[!a]x"], "!x"));
        assert!(ignored(&["[^a]x"], "bx"));
        assert!(IgnoreMatcher::from_file_text("[Local-Only]").is_err());
        assert!(IgnoreMatcher::from_file_text("!").is_err());
        assert!(IgnoreMatcher::from_file_text("a[").is_err());
    }

    #[test]
    fn cleaning() {
        assert_eq!(clean_path("docs/../src"), "src");
        assert_eq!(clean_path("./a//b/"), "a/b");
        assert_eq!(clean_path("/../a"), "/a");
        assert_eq!(clean_path("../a"), "../a");
    }

    /// The matcher as it was before it matched in one pass: every pattern tried on the path
    /// and on each of its directories, one by one. The reference the fuzz test holds the
    /// matcher to.
    fn reference_ignored(m: &IgnoreMatcher, path: &str) -> bool {
        let ancestors: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let mut matched = false;
        for p in &m.compiled.patterns {
            if p.exclusion != matched {
                continue;
            }
            if p.matches(path) || ancestors.iter().any(|a| p.matches(a)) {
                matched = !p.exclusion;
            }
        }
        matched
    }

    fn reference_walked_out(m: &IgnoreMatcher, path: &str, is_dir: bool) -> bool {
        if m.is_empty() {
            return false;
        }
        for (i, _) in path.match_indices('/') {
            let dir = &path[..i];
            if reference_ignored(m, dir) && !m.may_reinclude_below(dir) {
                return true;
            }
        }
        reference_ignored(m, path) && !(is_dir && m.may_reinclude_below(path))
    }

    #[test]
    fn fuzz_one_pass_matching_agrees_with_trying_every_directory() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x1915);
        let names = ["a", "b", "ab", "a.b", "node_modules", "x y", "é"];
        let pieces = [
            "a", "b", "*", "**", "?", "[ab]", "[!a]", "/", ".", "..", "\\*", "é",
        ];
        for round in 0..3000 {
            let n = rng.gen_range(1..6);
            let patterns: Vec<String> = (0..n)
                .map(|_| {
                    let len = rng.gen_range(1..7);
                    let body: String = (0..len)
                        .map(|_| pieces[rng.gen_range(0..pieces.len())])
                        .collect();
                    if rng.gen_bool(0.25) {
                        format!("!{}", body)
                    } else {
                        body
                    }
                })
                .collect();
            let Ok(m) = IgnoreMatcher::new(&patterns) else {
                continue;
            };
            for _ in 0..20 {
                let depth = rng.gen_range(1..7);
                let path: Vec<&str> = (0..depth)
                    .map(|_| names[rng.gen_range(0..names.len())])
                    .collect();
                let path = path.join("/");
                let is_dir = rng.gen_bool(0.5);
                assert_eq!(
                    m.is_ignored(&path),
                    reference_ignored(&m, &path),
                    "round {round}: {patterns:?} on {path:?}"
                );
                assert_eq!(
                    m.is_walked_out(&path, is_dir),
                    reference_walked_out(&m, &path, is_dir),
                    "round {round}: {patterns:?} on {path:?} (dir: {is_dir})"
                );
            }
        }
    }
}
