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
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
}

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
        Ok(IgnoreMatcher { patterns: out })
    }

    /// True when there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether an exception pattern's text names something below `dir`: the context walker
    /// of docker (fsutil) still enters an excluded directory then, and keeps it.
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        let prefix = format!("{}/", dir);
        self.patterns
            .iter()
            .any(|p| p.exclusion && format!("{}/", p.cleaned).starts_with(&prefix))
    }

    /// Whether `path` is left out of the context as docker's walker leaves it out: an excluded
    /// file is; an excluded directory is unless an exception may re-include something below
    /// it; and everything below a directory the walker skipped is.
    pub fn is_walked_out(&self, path: &str, is_dir: bool) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let dir = &path[..end + i];
            if self.is_ignored(dir) && !self.may_reinclude_below(dir) {
                return true;
            }
            end += i + 1;
        }
        self.is_ignored(path) && !(is_dir && self.may_reinclude_below(path))
    }

    /// Whether `path` (context-relative, `/`-separated) is excluded: the last pattern that
    /// matches it or one of its parent directories decides.
    pub fn is_ignored(&self, path: &str) -> bool {
        let parent = match path.rfind('/') {
            Some(i) => &path[..i],
            None => ".",
        };
        let dirs: Vec<&str> = parent.split('/').collect();
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut m = p.matches(path);
            if !m && parent != "." {
                m = (0..dirs.len()).any(|i| p.matches(&dirs[..=i].join("/")));
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
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
}
